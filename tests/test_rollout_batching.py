"""Row cap + continuous batching (``rollout.max_batch_rows``): the same outputs as one static batch.

A capped call admits prompts as whole groups when rows finish, so rows decode at different steps (per-row
positions, cache writes, own-key masks, sampling steps). Against the uncapped engine on the same weights, at
TP=1, TP=2 and PP=2 (one 2-rank spawn; TP=1 runs on both ranks as data-parallel replicas): token-identical
greedy and sampled outputs, equal lengths, finish reasons and order, log-probs to float rounding; the scheduling
counts show that refills really happened with rows at different steps and that the cap held. The fixed-shape
decode (static buffers and batch buckets: the CUDA-graph path, eager on CPU) equals it too. Also: megatron's
own cache path runs in static waves under a cap, the admission rule, the bucket padding, the config / settings
errors, the memory plan with a cap, and the benchmark's smoke run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_tiny import make_hf_model

ROOT = Path(__file__).resolve().parents[1]
EOS = list(range(0, 240, 12))  # many EOS ids: rows of the tiny model end at different lengths
NEW = 12
CAPS = (3, 5, 7)  # n = 3 (sampled): one prompt at a time, one group + spare rows, two groups + one spare row


def _more_prompts():
    from test_rollout import _prompts

    g = torch.Generator().manual_seed(3)
    return _prompts() + [(torch.randint(0, 240, (k,), generator=g), None, None) for k in (5, 9, 4)]


def _lists(out):
    return dict(ids=out.response_ids.tolist(), lp=out.logprobs.tolist(), lengths=out.lengths.tolist(),
                reasons=out.finish_reasons, index=out.prompt_index.tolist(), seqs=[s.tolist() for s in out.sequences])


def _body(rank, world_size, hf_dir, prompts_raw):
    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.platform import init_model_parallel
    from megatron_papo.rollout import MegatronEngine, SamplingParams

    spec = spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    prompts = [PromptInputs(*p) for p in prompts_raw]
    sampled = SamplingParams(temperature=1.2, top_p=0.9, top_k=50, max_new_tokens=NEW)
    greedy = SamplingParams(greedy=True, max_new_tokens=NEW)
    results = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_model_parallel(tp=tp, pp=pp)
        model = build_vlm(spec).eval()
        fill_from_hf(model, HFCheckpoint(hf_dir))
        r = {}
        for cap in (0,) + CAPS:
            engine = MegatronEngine(model, max_seq_len=40, eos_ids=EOS, max_rows=cap)
            r[f"s{cap}"] = _lists(engine.generate(prompts, 3, sampled, seed=11, row_offset=6))
            r[f"s{cap}"]["stats"] = dict(engine.last_stats)
            if cap in (0, 5):
                r[f"g{cap}"] = _lists(engine.generate(prompts, 2, greedy, seed=0))
        for cap in (0, 7):  # fixed-shape decode (the CUDA-graph path; eager on CPU)
            engine = MegatronEngine(model, max_seq_len=40, eos_ids=EOS, max_rows=cap, fixed_shape=True)
            r[f"fixed{cap}"] = _lists(engine.generate(prompts, 3, sampled, seed=11, row_offset=6))
            r[f"fixed{cap}"]["stats"] = dict(engine.last_stats)
        r["fixed_greedy"] = _lists(engine.generate(prompts, 2, greedy, seed=0))
        if tp == 1 and pp == 1:
            for cap in (0, 5):  # megatron's own cache (no sharing): static waves of cap // n prompts
                engine = MegatronEngine(model, max_seq_len=40, eos_ids=EOS, max_rows=cap)
                engine.shared_cache = False
                r[f"megatron{cap}"] = _lists(engine.generate(prompts, 3, sampled, seed=11, row_offset=6))
        results[f"tp{tp}pp{pp}"] = r
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from multirank import run_multirank

    hf_dir = str(tmp_path_factory.mktemp("hf"))
    make_hf_model(hf_dir)
    return run_multirank(_body, world_size=2, args=(hf_dir, _more_prompts()), timeout=300)


def _same(got, want):
    for key in ("ids", "lengths", "reasons", "index", "seqs"):
        assert got[key] == want[key], key
    torch.testing.assert_close(torch.tensor(got["lp"]), torch.tensor(want["lp"]), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1", "tp1pp2"])
@pytest.mark.parametrize("cap", CAPS)
def test_capped_sampling_equals_the_static_batch(results, layout, cap):
    for rank in (0, 1):  # every rank of the model-parallel group returns the same output
        r = results[rank][layout]
        _same(r[f"s{cap}"], r["s0"])
    stats = results[0][layout][f"s{cap}"]["stats"]
    assert stats["peak_rows"] <= cap, stats
    assert stats["admissions"] > 1, stats
    if cap > 3:  # room for more than one group: refills join rows that are further on
        assert stats["mixed_steps"] > 0, stats
    assert results[0][layout]["s0"]["stats"]["admissions"] == 1  # no cap: one prefill of every prompt


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1", "tp1pp2"])
def test_capped_greedy_equals_the_static_batch(results, layout):
    r = results[0][layout]
    _same(r["g5"], r["g0"])


def test_the_outputs_are_varied_enough_to_test_refills(results):
    r = results[0]["tp1pp1"]["s0"]
    assert len(set(r["lengths"])) >= 4 and {"eos", "length"} <= set(r["reasons"]), r["lengths"]


def test_layouts_agree_under_the_cap(results):
    base = results[0]["tp1pp1"]["s5"]
    for layout in ("tp2pp1", "tp1pp2"):
        assert results[0][layout]["s5"]["ids"] == base["ids"]


def test_megatron_cache_runs_static_waves_with_the_same_outputs(results):
    r = results[0]["tp1pp1"]
    _same(r["megatron5"], r["megatron0"])
    _same(r["megatron0"], r["s0"])


@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1", "tp1pp2"])
def test_fixed_shape_decode_equals_the_normal_path(results, layout):
    r = results[0][layout]
    for cap in (0, 7):
        _same(r[f"fixed{cap}"], r["s0"])
        stats = r[f"fixed{cap}"]["stats"]
        assert stats["graph_steps"] == 0, stats  # no graphs on CPU: every step ran eagerly
        assert stats["row_steps"] % 3 == 0 and stats["peak_rows"] <= (cap or 18), stats  # whole groups per step
    assert r["fixed7"]["stats"]["admissions"] > 1
    _same(r["fixed_greedy"], r["g0"])


def test_fixed_shape_buckets_pad_to_whole_groups():
    from megatron_papo.rollout.graph_decode import group_buckets, step_rows

    assert group_buckets(3).sizes == [1, 2, 3]  # GraphBuckets' 1, 2, 8 cut to the 3 slots there are
    six = group_buckets(6)
    assert six.sizes == [1, 2, 4, 6]
    free = [False] * 6
    assert step_rows(free, 3, six) == 0  # nothing to run
    for top, rows in [(0, 3), (1, 6), (2, 12), (3, 12), (4, 18), (5, 18)]:
        occupied = [g == top for g in range(6)]
        assert step_rows(occupied, 3, six) == rows, top
    assert step_rows([True, False, True, False, False, False], 3, six) == 12  # the highest slot decides


def test_slots_admit_whole_groups_within_the_cap():
    from megatron_papo.rollout.scheduler import Slots

    s = Slots(5, 3, max_rows=7)
    assert s.admit(0) == [0, 1]  # 6 rows of 7
    assert s.admit(6) == [] and s.admit(5) == []  # one or two free slots: a group of 3 does not fit
    assert s.admit(4) == [2]
    assert s.admit(0) == [3, 4] and s.waiting == []
    assert Slots(4, 2).admit(0) == [0, 1, 2, 3]  # no cap: everything at once
    with pytest.raises(ValueError, match="max_batch_rows"):
        Slots(4, 3, max_rows=2)


def test_engine_and_config_refuse_a_cap_below_n():
    from megatron_papo.config import ConfigError, load_config
    from megatron_papo.evaluation.settings import EvalSettings

    with pytest.raises(ConfigError, match="rollout.max_batch_rows"):
        load_config(None, ["rollout.n=4", "rollout.max_batch_rows=3"])
    load_config(None, ["rollout.n=4", "rollout.max_batch_rows=4"])
    with pytest.raises(ValueError, match="--max-batch-rows"):
        EvalSettings(k=8, max_batch_rows=4)
    assert "max_batch_rows" not in EvalSettings(k=8, max_batch_rows=8).to_dict()  # memory only: not paired on


def test_concat_outputs_continues_prompt_indices():
    from megatron_papo.rollout.base import empty_output
    from megatron_papo.rollout.scheduler import concat_outputs
    from megatron_papo.data.prompts import PromptInputs

    p = [PromptInputs(torch.tensor([1, 2]), None, None)]
    out = concat_outputs([empty_output(p, 2, 0), empty_output(p * 2, 2, 0)], 0)
    assert out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2] and len(out) == 6


def test_memory_plan_counts_the_cap_and_advises_it():
    from megatron_papo.config import load_config
    from megatron_papo.training.memory_plan import describe_memory, plan_memory, prompt_tokens

    recipe = "examples/qwen2.5-vl-7b_papo_g.yaml"
    cfg = load_config(str(ROOT / recipe), ["model.recompute=true"])
    capped = load_config(str(ROOT / recipe), ["model.recompute=true", "rollout.max_batch_rows=160"])
    lp, t, per_position = prompt_tokens(cfg), 2048, 28 * 2 * 2 * 128 * 2
    assert plan_memory(cfg, 4)[0].kv_cache == per_position * (96 * lp + 480 * t)
    # at most cap rows; prompts: each held prompt has a row, and a group joins only with n free slots
    assert plan_memory(capped, 4)[0].kv_cache == per_position * (min(96, 160 - 5 + 1) * lp + 160 * t)
    text = "\n".join(describe_memory(cfg, 4))
    assert "does NOT fit" in text and "rollout.max_batch_rows=" in text, text
    assert "memory: fits" in "\n".join(describe_memory(capped, 4))
    # the advice is a command line the CLI takes as it is printed, and what it sets makes the plan fit
    from megatron_papo.cli import _parser

    advice = text.split("try ", 1)[1].split(" (peak", 1)[0]
    args = _parser().parse_args(["train", "--config", str(ROOT / recipe), "--dry-run", "--set", "model.recompute=true",
                                 *advice.split()])
    advised = load_config(args.config, args.overrides)
    assert "memory: fits" in "\n".join(describe_memory(advised, 4)), advice


def test_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout_batching.py"), "--smoke"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio=") and float(last.split("=")[1]) > 0, out.stdout


def test_per_row_own_lengths_against_float64_attention():
    """SDPAttention on a SharedPrefixKV with own_len: each row attends to its prompt's real keys and its first
    own_len[i] own keys, nothing else (plain float64 softmax attention per row, GQA by repeating K/V)."""
    from types import SimpleNamespace

    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_papo.models.common.attention import SDPAttention, SharedPrefixKV

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16)
    attn = SDPAttention(cfg, 1, AttnMaskType.no_mask, "self", pg_collection=SimpleNamespace(tp=SimpleNamespace(
        size=lambda: 1)))
    g = torch.Generator().manual_seed(0)
    counts, L, T, hn = [3, 1, 2], 5, 7, 16  # rows per prompt (prompt-major), prompt length, own positions
    b, P = sum(counts), len(counts)
    q = torch.randn(1, b, 4, hn, generator=g)
    pk, pv = torch.randn(P, 2, L, hn, generator=g), torch.randn(P, 2, L, hn, generator=g)
    keep = torch.ones(P, L, dtype=torch.bool)
    keep[1, :2] = False  # prompt 1 is left-padded
    ok, ov = torch.randn(b, 2, T, hn, generator=g), torch.randn(b, 2, T, hn, generator=g)
    own_len = torch.tensor([1, 4, 7, 2, 3, 5])
    late = (torch.arange(T)[None, :] >= own_len[:, None])[:, None, :, None]  # [b, 1, T, 1]
    ok.masked_fill_(late, 1e3), ov.masked_fill_(late, 1e3)  # past each row's step: would dominate if read
    got = attn(q, SharedPrefixKV(pk, pv, keep, counts, ok, ov, True, own_len=own_len),
               None, None, None)[0].reshape(b, 4, hn)
    prompt = torch.repeat_interleave(torch.arange(P), torch.tensor(counts))
    for i in range(b):
        p, n_own = int(prompt[i]), int(own_len[i])
        k = torch.cat([pk[p][:, keep[p]], ok[i, :, :n_own]], 1).double().repeat_interleave(2, 0)  # [4, s, hn]
        v = torch.cat([pv[p][:, keep[p]], ov[i, :, :n_own]], 1).double().repeat_interleave(2, 0)
        w = torch.softmax(q[0, i].double()[:, None] @ k.transpose(-1, -2) / hn ** 0.5, -1)  # [4, 1, s]
        torch.testing.assert_close(got[i].double(), (w @ v)[:, 0], atol=1e-5, rtol=1e-5)
