"""Rollout engine on the megatron Qwen2.5-VL: greedy equals transformers' generate on the same weights (text and
image prompts, batched with left padding), at TP=1, TP=2 and PP=2; sampled log-probs equal a teacher-forced
forward; EOS / stop strings / budgets finish rows independently; edge cases fail clearly.

One 2-rank spawn runs every layout (TP=1 runs on both ranks as data-parallel replicas).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_tiny import IMG, VEND, VSTART, make_hf_model

NEW = 8


def _prompts():
    """Two text prompts of different lengths and one image prompt: (input_ids, pixel_values, grid)."""
    g = torch.Generator().manual_seed(1)
    txt = lambda n: torch.randint(0, 240, (n,), generator=g).tolist()  # noqa: E731
    grid = torch.tensor([[1, 4, 8]])
    img = [VSTART] + [IMG] * 8 + [VEND]
    return [
        (torch.tensor(txt(7)), None, None),
        (torch.tensor(txt(3) + img + txt(4)), torch.randn(32, 1176, generator=g), grid),
        (torch.tensor(txt(12)), None, None),
    ]


@torch.no_grad()
def _hf_greedy(model, prompt):
    ids, pv, grid = prompt
    ids = ids[None]
    images = dict(pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int()) if pv is not None else {}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                         eos_token_id=None, pad_token_id=0, **images)
    return out[0, ids.shape[1]:].tolist()


class CharTokenizer:
    """Each id decodes to one letter: enough for stop strings."""

    eos_id, pad_id = 255, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@torch.no_grad()
def _teacher_forced(model, out, prompts, params):
    """Log-probs of every response token from one full forward per row (no KV cache)."""
    from megatron.core import parallel_state as ps

    from megatron_papo.rollout.sampling import log_probs_of

    got = []
    for k, seq in enumerate(out.sequences):
        p = prompts[int(out.prompt_index[k])]
        s, n = p.input_ids.numel(), int(out.lengths[k])
        logits = model(seq[None], pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)[0]  # [s+n, Vs]
        cols = torch.arange(logits.shape[-1]) + ps.get_tensor_model_parallel_rank() * logits.shape[-1]
        logits = logits.masked_fill((cols == VSTART) | (cols == IMG), float("-inf"))  # the engine's banned tokens
        got.append(log_probs_of(logits[s - 1:s - 1 + n], seq[s:], params, vocab_size=model.spec.vocab_size).tolist())
    return got


def _engine_body(rank, world_size, hf_dir, prompts_raw):
    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.platform import init_model_parallel
    from megatron_papo.rollout import MegatronEngine, RolloutBackend, SamplingParams

    spec = spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    prompts = [PromptInputs(*p) for p in prompts_raw]
    greedy = SamplingParams(greedy=True, max_new_tokens=NEW)
    sampled = SamplingParams(temperature=1.2, top_p=0.9, top_k=50, max_new_tokens=NEW)
    results = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_model_parallel(tp=tp, pp=pp)
        model = build_vlm(spec).eval()
        fill_from_hf(model, HFCheckpoint(hf_dir))
        engine = MegatronEngine(model, max_seq_len=64, eos_ids=[])
        assert isinstance(engine, RolloutBackend)
        g = engine.generate(prompts, 2, greedy, seed=0)
        s = engine.generate(prompts, 3, sampled, seed=7)
        # plain lists: tensors cross the process boundary through file descriptors of exiting ranks
        r = dict(greedy=g.response_ids.tolist(), greedy_lp=g.logprobs.tolist(), sampled=s.response_ids.tolist(),
                 sampled_lp=s.logprobs.tolist(), reasons=g.finish_reasons + s.finish_reasons)
        if pp == 1:
            r["tf_greedy"] = _teacher_forced(model, g, prompts, greedy)
            r["tf_sampled"] = _teacher_forced(model, s, prompts, sampled)
            r["lengths"] = s.lengths.tolist()
            r["again"] = engine.generate(prompts, 3, sampled, seed=7).response_ids.tolist()
            r["other_seed"] = engine.generate(prompts, 3, sampled, seed=8).response_ids.tolist()
        if tp == 2:  # the trimmed prefill's last layer (rollout/prefill.py) with a tensor-parallel qkv
            from test_prefill import compare_prefills

            engine.prefill_batch_size = 2
            r["prefill"] = compare_prefills(engine, prompts)
        results[f"tp{tp}pp{pp}"] = r
        if tp == 1 and pp == 1:
            results["megatron_cache"] = _megatron_cache_path(model, prompts, sampled)
            results["finish"] = _finish_cases(model, prompts, g)
            results["edges"] = _edge_cases(model, prompts)
    return results


def _megatron_cache_path(model, prompts, params):
    """The same sampling through megatron-core's own static-cache path (un-rotated keys, re-rotated each step)."""
    from megatron_papo.rollout import MegatronEngine

    engine = MegatronEngine(model, max_seq_len=64, eos_ids=[])
    fast = engine.shared_cache
    engine.shared_cache = False
    out = engine.generate(prompts, 3, params, seed=7)
    return dict(fast=fast, sampled=out.response_ids.tolist(), sampled_lp=out.logprobs.tolist())


def _finish_cases(model, prompts, greedy_out):
    """EOS for some rows, a stop string for others, a short budget from max_seq_len for the long prompt."""
    from megatron_papo.rollout import MegatronEngine, SamplingParams

    ref = greedy_out.response_ids  # [6, NEW], rows 2k, 2k+1 are prompt k
    eos = int(ref[0, 2])  # prompt 0 ends at its 3rd token (or earlier if it repeats)
    stop = CharTokenizer().decode(ref[4, 3:5].tolist())
    tok = CharTokenizer()
    engine = MegatronEngine(model, max_seq_len=21, eos_ids=[eos], tokenizer=tok)  # prompt 1 (17 tokens): 4 new
    out = engine.generate(prompts, 2, SamplingParams(greedy=True, max_new_tokens=NEW, stop=[stop]), seed=0)
    with_end = type("VisionEndTokenizer", (CharTokenizer,), {"vision_end_id": 7})()  # the trainer's ban list
    spec = model.spec
    banned = dict(plain=engine.banned_ids.tolist(), want=sorted({spec.image_token_id, spec.vision_start_token_id}),
                  with_end=MegatronEngine(model, max_seq_len=21, tokenizer=with_end).banned_ids.tolist())
    return dict(eos=eos, stop=stop, ref=ref.tolist(), ids=out.response_ids.tolist(), lengths=out.lengths.tolist(),
                reasons=out.finish_reasons, mask=out.response_mask.tolist(),
                seqs=[t.tolist() for t in out.sequences], banned=banned)


def _edge_cases(model, prompts):
    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.rollout import MegatronEngine, SamplingParams

    engine = MegatronEngine(model, max_seq_len=12, eos_ids=[1])
    errors = {}
    for name, call in {
        "empty": lambda: engine.generate([PromptInputs(torch.zeros(0, dtype=torch.long), None, None)], 1,
                                         SamplingParams(), 0),
        "too_long": lambda: engine.generate([prompts[2]], 1, SamplingParams(), 0),  # 12 tokens, max_seq_len 12
        "n0": lambda: engine.generate([prompts[0]], 0, SamplingParams(), 0),
        "stop_without_tokenizer": lambda: engine.generate([prompts[0]], 1, SamplingParams(stop=["x"]), 0),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    zero = engine.generate([prompts[0], prompts[0]], 2, SamplingParams(max_new_tokens=0), 0)
    none = engine.generate([], 2, SamplingParams(), 0)
    return dict(errors=errors, zero_shape=tuple(zero.response_ids.shape), zero_seq=zero.sequences[1].tolist(),
                none=len(none))


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    from multirank import run_multirank

    hf_dir = str(tmp_path_factory.mktemp("hf"))
    hf = make_hf_model(hf_dir)
    prompts = _prompts()
    refs = [_hf_greedy(hf, p) for p in prompts]
    results = run_multirank(_engine_body, world_size=2, args=(hf_dir, prompts), timeout=400)
    return refs, prompts, results


def test_greedy_equals_transformers_generate_at_every_layout(engine_results):
    refs, _, results = engine_results
    expected = [r for r in refs for _ in range(2)]  # n=2 greedy samples per prompt, prompt-major
    for rank_results in results:
        for layout in ("tp1pp1", "tp2pp1", "tp1pp2"):
            assert rank_results[layout]["greedy"] == expected, layout


def test_trimmed_prefill_equals_plain_prefill_at_tp2(engine_results):
    _, prompts, results = engine_results
    for rank_results in results:
        r = rank_results["tp2pp1"]["prefill"]
        assert r["supported"] and r["mlp_rows"] == [1] * -(-len(prompts) // 2), r  # chunks of 2 prompts
        assert r["logits"] <= 1e-5 and r["cache"] <= 1e-5, r  # float32 rounding (test_prefill: float64)


def test_log_probs_equal_teacher_forced_forward(engine_results):
    _, _, results = engine_results
    for layout in ("tp1pp1", "tp2pp1"):
        r = results[0][layout]
        for kind in ("greedy", "sampled"):
            lp = torch.tensor(r[f"{kind}_lp"])
            for k, tf in enumerate(r[f"tf_{kind}"]):
                tf = torch.tensor(tf)
                torch.testing.assert_close(lp[k, :tf.numel()], tf, atol=1e-4, rtol=1e-4)
                assert torch.isfinite(tf).all()


def test_sampling_reproducible_and_layout_independent(engine_results):
    _, _, results = engine_results
    base = results[0]["tp1pp1"]
    assert base["again"] == base["sampled"]
    assert base["other_seed"] != base["sampled"]
    assert len({tuple(row) for row in base["sampled"]}) > 3, "samples of one prompt should differ"
    for rank_results in results:
        for layout in ("tp2pp1", "tp1pp2"):
            assert rank_results[layout]["sampled"] == base["sampled"], layout
            torch.testing.assert_close(torch.tensor(rank_results[layout]["sampled_lp"]),
                                       torch.tensor(base["sampled_lp"]), atol=1e-4, rtol=1e-4)


def test_shared_prompt_cache_equals_megatron_cache_path(engine_results):
    _, _, results = engine_results
    base, slow = results[0]["tp1pp1"], results[0]["megatron_cache"]
    assert slow["fast"], "the local spec's attention should use the shared-prompt, rotated-key cache"
    assert slow["sampled"] == base["sampled"]
    torch.testing.assert_close(torch.tensor(slow["sampled_lp"]), torch.tensor(base["sampled_lp"]),
                               atol=1e-5, rtol=1e-5)


def test_default_banned_tokens_follow_the_trainer(engine_results):
    """Without banned_ids the engine bans the image and vision-start tokens, plus the tokenizer's vision-end token
    when it has one (the trainer's list, training.banned_tokens), so evaluate / generate sample what training does."""
    b = engine_results[2][0]["finish"]["banned"]
    assert b["plain"] == b["want"] and b["with_end"] == sorted(set(b["want"]) | {7})


def test_rows_finish_independently(engine_results):
    _, _, results = engine_results
    f = results[0]["finish"]
    ref, eos, stop = f["ref"], f["eos"], f["stop"]
    tok = CharTokenizer()
    for row in range(6):
        limit = 4 if row in (2, 3) else NEW  # prompt 1 has 17 tokens in max_seq_len 21
        want, reason = [], "length"
        for t in ref[row][:limit]:
            want.append(t)
            if t == eos:
                reason = "eos"
                break
            if stop in tok.decode(want[-(len(stop) + 2):]):
                reason = "stop"
                break
        n = len(want)
        assert f["ids"][row][:n] == want and f["lengths"][row] == n, (row, f)
        assert f["reasons"][row] == reason, (row, f["reasons"])
        assert f["mask"][row] == [True] * n + [False] * (len(f["mask"][row]) - n)
        assert all(t == 0 for t in f["ids"][row][n:])  # padded with the pad id
        assert f["seqs"][row][-n:] == want
    assert {"eos", "stop", "length"} <= set(f["reasons"]), f["reasons"]


def test_edge_cases_fail_clearly_or_return_empty(engine_results):
    _, prompts, results = engine_results
    e = results[0]["edges"]
    assert "empty" in e["errors"]["empty"]
    assert "max_seq_len" in e["errors"]["too_long"]
    assert "n (samples per prompt)" in e["errors"]["n0"]
    assert "tokenizer" in e["errors"]["stop_without_tokenizer"]
    assert e["zero_shape"] == (4, 0) and e["zero_seq"] == prompts[0][0].tolist()
    assert e["none"] == 0
