"""Evaluation at any layout, and the perception KL against an independent reference.

- DP=2 (two ranks, questions dealt over them, an uneven last round) gives the same per-question records as one
  process batching the questions differently, perception included (answers with the masked and the blank
  image, KL sums);
- PP=2 (the same weights split over two stages) gives the same records as one process;
- a question whose prompt cannot be encoded (too long, image refused) is a counted skip with shard and key;
- the per-token KL between the next-token distributions with the real and the masked image, computed on the
  vocabulary shards through megatron's schedule, equals a float64 computation on the gathered logits, at TP=1
  and TP=2 (exact KL and k3 on the sampled tokens).
"""

from __future__ import annotations

import pytest
import torch

from multirank import run_multirank

K, NEW = 2, 5


def _setup(spm_path: str):
    from megatron_papo.data import Qwen2VLImageProcessor, make_synthetic_samples
    from megatron_papo.data.tokenizer import SentencePieceTokenizer
    from megatron_papo.models import build_vlm

    tok = SentencePieceTokenizer(spm_path)
    model = build_vlm("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                      vision_start_token_id=tok.vision_start_id)
    with torch.no_grad():                                     # sharper distributions than the 0.02 init
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.eval()
    questions = [{**s, "id": f"q{i}", "index": i} for i, s in enumerate(make_synthetic_samples(5, seed=3))]
    return model, tok, Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=84 * 84), questions


def _records(spm_path: str, batch_size: int, weights: str | None = None):
    """Records of the 5 questions; ``weights``: a dist checkpoint directory, written from this model when
    absent, loaded into it (resharded to this layout) when present."""
    import os

    from megatron_papo.evaluation import EvalSettings, evaluate
    from megatron_papo.training.checkpoint import load_checkpoint, save_checkpoint

    model, tok, proc, questions = _setup(spm_path)
    if weights is not None and os.path.isdir(os.path.join(weights, "step_0")):
        load_checkpoint(os.path.join(weights, "step_0"), [model])
    elif weights is not None:
        save_checkpoint(weights, 0, [model])
    settings = EvalSettings(k=K, max_new_tokens=NEW, seed=11, perception=True, batch_size=batch_size)
    return evaluate(model, tok, proc, questions, settings, progress=False)


def _reference_kl(model, rows, masked, temperature):
    """float64 on the gathered logits: per row (sum KL(real || masked), sum k3, tokens) over response tokens."""
    from megatron_papo.training.sequences import pack

    out = []
    for i in range(len(rows)):
        one = rows.select([i])
        lp = []
        for r in (one, one.with_images([masked[i]])):
            mb = pack(r, 1, 0, image_token_id=None)[0]
            logits = model(mb.input_ids, pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw,
                           runtime_gather_output=True)[0].double() / temperature     # [S, V]
            lp.append(torch.log_softmax(logits[mb.resp_index[0]], -1))                # [T, V]
        p, q = lp
        kl = torch.where(p.exp() > 0, p.exp() * (p - q), torch.zeros_like(p)).sum(-1)
        tgt = one.response_ids[0]
        d = (q.gather(1, tgt[:, None]) - p.gather(1, tgt[:, None])).squeeze(1).clamp(-20, 20)
        k3 = (d.exp() - d - 1).clamp(-10, 10)
        m = one.response_mask[0].double()
        out.append([(kl * m).sum().item(), (k3 * m).sum().item(), m.sum().item()])
    return torch.tensor(out, dtype=torch.float64)


def _kl_check(spm_path: str):
    """Largest relative difference of perception_kl against the float64 reference on this layout."""
    from megatron_papo.data import encode_prompt
    from megatron_papo.evaluation.perception import masked_images, perception_kl, view_prompt
    from megatron_papo.evaluation.settings import EvalSettings
    from megatron_papo.training.sequences import Rows

    model, tok, proc, questions = _setup(spm_path)
    g = torch.Generator().manual_seed(5)
    prompts, views = [], []
    for q in questions[:3]:
        p = encode_prompt(tok, proc, q["question"], q["images"])
        prompts.append(p)
        views.append(view_prompt(p, masked_images(q["images"], EvalSettings(), q["index"]), proc))
    n = 2 * len(prompts)
    resp = torch.randint(5, tok.vocab_size, (n, 6), generator=g)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 5, 1, 6, 4])[:, None]
    rows = Rows([prompts[i // 2].input_ids for i in range(n)], resp.masked_fill(~mask, 0), mask,
                [(prompts[i // 2].pixel_values, prompts[i // 2].image_grid_thw) for i in range(n)])
    masked = [(views[i // 2].pixel_values, views[i // 2].image_grid_thw) for i in range(n)]
    with torch.no_grad():
        got = perception_kl(model, rows, masked, tok.pad_id, tok.image_token_id, 0.8, micro_batch_size=4)
        ref = _reference_kl(model, rows, masked, 0.8)
    assert torch.equal(got[:, 2], ref[:, 2])
    return (got - ref).abs().max(0).values.tolist(), ref.abs().max(0).values.tolist(), ref[:, 0].min().item()


def _skips(spm_path: str):
    """The 5 questions, then the same with question 1 too long and question 3's image refused by the processor."""
    from PIL import Image

    from megatron_papo.data import encode_prompt
    from megatron_papo.evaluation import EvalSettings, evaluate

    model, tok, proc, questions = _setup(spm_path)
    longest = max(len(encode_prompt(tok, proc, q["question"], q["images"])) for q in questions)
    settings = EvalSettings(k=K, max_new_tokens=NEW, seed=11, batch_size=5)
    bad = [dict(q) for q in questions]
    bad[1]["question"] = bad[1]["question"] * 20
    bad[3].update(images=[Image.new("RGB", (2000, 8))], shard="val/shard-0.tar", key="k3")  # aspect ratio 250
    run = lambda qs: evaluate(model, tok, proc, qs, settings, progress=False, max_prompt_length=longest)  # noqa: E731
    return run(questions), run(bad)


def _single(rank, world_size, spm_path, weights):
    return {"eval": _records(spm_path, 3, weights), "kl": _kl_check(spm_path), "skips": _skips(spm_path)}


def _two(rank, world_size, spm_path, weights):
    from megatron_papo.platform import init_model_parallel

    res = _records(spm_path, 2)                               # tp=1: DP=2, batches [0,1] [4] | [2,3]
    init_model_parallel(tp=2, pp=1, seed=1234)
    kl = _kl_check(spm_path)
    init_model_parallel(tp=1, pp=2, seed=1234)                # the single process's weights, split in 2 stages
    return {"eval": res, "kl": kl, "pp2": _records(spm_path, 3, weights)}


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    from megatron_papo.config import TokenizerConfig
    from megatron_papo.data.tokenizer import build_tokenizer

    return str(build_tokenizer(TokenizerConfig(), cache_dir=tmp_path_factory.mktemp("tok")).path)


@pytest.fixture(scope="module")
def runs(spm, tmp_path_factory):
    weights = str(tmp_path_factory.mktemp("weights"))
    one = run_multirank(_single, world_size=1, args=(spm, weights), tp=1)[0]
    two = run_multirank(_two, world_size=2, args=(spm, weights), tp=1)
    return one, two


def _same_records(a: list, b: list):
    assert [r["id"] for r in a] == [f"q{i}" for i in range(5)] == [r["id"] for r in b]
    for ra, rb in zip(a, b):
        ints = {k: v for k, v in ra.items() if not isinstance(v, float)}
        assert ints == {k: rb[k] for k in ints}, (ra, rb)
        for key in ("kl_sum", "k3_sum"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-7)


def test_dp2_records_equal_single_process(runs):
    one, two = runs
    assert two[0]["eval"]["records"] == two[1]["eval"]["records"], "every rank ends with all records"
    a = one["eval"]["records"]
    _same_records(a, two[0]["eval"]["records"])
    assert sum(r["tokens"] for r in a) > 0 and sum(r["kl_sum"] for r in a) > 0
    ov = one["eval"]["datasets"]["overall"]
    assert ov["questions"] == 5 and ov["samples"] == 5 * K
    assert ov["reliance_masked"] == pytest.approx(ov["avg@k"] - ov["avg@k_masked"])


def test_pp2_records_equal_single_process(runs):
    """The same weights split over two pipeline stages answer, grade and score exactly as one process."""
    one, two = runs
    for rank in range(2):
        _same_records(one["eval"]["records"], two[rank]["pp2"]["records"])
    assert two[0]["pp2"]["datasets"] == two[1]["pp2"]["datasets"]


def test_prompts_that_cannot_be_encoded_are_counted_skips(runs):
    """A too-long prompt and an image the processor refuses are skipped with shard, key and reason; the other
    questions keep their sampling streams (records equal to the run without bad questions)."""
    full, got = runs[0]["skips"]
    assert not full["skipped"] and len(full["records"]) == 5
    assert [r["index"] for r in got["records"]] == [0, 2, 4]
    assert got["records"] == [full["records"][i] for i in (0, 2, 4)]
    assert [(s["index"], s["reason"]) for s in got["skipped"]] == [(1, "prompt_too_long"), (3, "bad_prompt")]
    assert (got["skipped"][1]["shard"], got["skipped"][1]["key"]) == ("val/shard-0.tar", "k3")
    assert "aspect ratio" in got["skipped"][1]["detail"] and "max_prompt_length" in got["skipped"][0]["detail"]
    assert got["datasets"]["overall"]["questions"] == 3


def test_skips_in_the_result_json_and_on_the_console(capsys):
    from argparse import Namespace

    from megatron_papo.evaluation.command import _print, skip_summary

    skipped = [{"shard": "a.tar", "key": "x", "reason": "bad_image", "detail": "d"},
               {"id": "q", "index": 4, "shard": "b.tar", "key": "y", "reason": "prompt_too_long", "detail": "d"}]
    summary = skip_summary(skipped)
    assert summary == {"count": 2, "by_reason": {"bad_image": 1, "prompt_too_long": 1}, "samples": skipped}
    settings = dict(checkpoint="c", k=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, seed=1, protocol=None)
    result = {"settings": settings, "layout": {"tp": 1, "pp": 1, "dp": 1}, "datasets": {"overall": {"questions": 3}},
              "speed": {"seconds": 1.0, "questions_per_s": 1.0, "answers_per_s": 2.0}, "skipped": summary}
    _print(result, Namespace(out=None))
    assert "skipped 2 samples (1 bad_image, 1 prompt_too_long)" in capsys.readouterr().out


def test_perception_kl_equals_float64_reference_tp1_tp2(runs):
    one, two = runs
    for err, scale, smallest in [one["kl"]] + [r["kl"] for r in two]:
        assert smallest > 0, "the masked image must change the distributions"
        assert err[0] < 1e-3 * scale[0] and err[1] < 1e-3 * scale[1], (err, scale)
