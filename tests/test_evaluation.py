"""Evaluation at any layout, and the perception KL against an independent reference.

- DP=2 (two ranks, questions dealt over them, an uneven last round) gives the same per-question records as one
  process batching the questions differently, perception included (answers with the masked and the blank
  image, KL sums);
- PP=2 (the same weights split over two stages) gives the same records as one process;
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


def _single(rank, world_size, spm_path, weights):
    return {"eval": _records(spm_path, 3, weights), "kl": _kl_check(spm_path)}


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


def test_perception_kl_equals_float64_reference_tp1_tp2(runs):
    one, two = runs
    for err, scale, smallest in [one["kl"]] + [r["kl"] for r in two]:
        assert smallest > 0, "the masked image must change the distributions"
        assert err[0] < 1e-3 * scale[0] and err[1] < 1e-3 * scale[1], (err, scale)
