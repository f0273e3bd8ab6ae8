"""Rollout speed work keeps outputs: sampled and greedy tokens pinned from the engine before the prepacked
matmuls (same seed, same tokens, with and without them), the prepacked matmul against a float64 reference, the
decode-step profiler's accounting, prompts without padding (no prefix mask) against megatron's own cache path, and
the CUDA-graph batch buckets (plain Python, tested on CPU).

Greedy equality with transformers and log-probs against a teacher-forced forward at TP1/TP2/PP2 are in
tests/test_rollout.py, which runs with the prepacked matmuls on (the engine's default).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from hf_tiny import make_hf_model

# produced by the engine before prepacked matmuls existed (commit 305d5c7): prompts of tests/test_rollout.py,
# eos_ids = 0, 12, ..., 228, max_seq_len 40; sampled: n=3, T=1.2, top_p 0.9, top_k 50, 16 tokens, seed 11;
# greedy: n=2, 16 tokens
PINNED_SAMPLED = [
    [131, 17, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [17, 19, 191, 102, 198, 149, 49, 241, 13, 2, 86, 122, 146, 64, 39, 3],
    [30, 106, 71, 44, 10, 155, 174, 120, 0, 0, 0, 0, 0, 0, 0, 0],
    [115, 77, 156, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [182, 163, 128, 19, 209, 85, 175, 116, 77, 123, 113, 75, 46, 128, 92, 235],
    [5, 162, 145, 138, 149, 173, 203, 161, 161, 239, 203, 163, 77, 229, 163, 203],
    [207, 25, 59, 68, 169, 102, 145, 151, 20, 71, 220, 6, 7, 147, 42, 79],
    [32, 171, 81, 194, 179, 94, 67, 241, 193, 207, 215, 123, 207, 68, 234, 200],
    [71, 206, 200, 5, 62, 4, 252, 57, 210, 165, 207, 111, 175, 77, 28, 233],
]
PINNED_SAMPLED_LENGTHS = [3, 16, 8, 3, 16, 16, 16, 16, 16]
PINNED_GREEDY = [
    [128, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122],
    [128, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122, 122],
    [192, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [192, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [37, 206, 46, 165, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71],
    [37, 206, 46, 165, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71, 71],
]
PINNED_GREEDY_LENGTHS = [16, 16, 1, 1, 16, 16]
EOS = list(range(0, 240, 12))


def _body(rank, world_size, hf_dir, prompts_raw):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from rollout_profile import profile_decode

    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.rollout import MegatronEngine, SamplingParams

    spec = spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    model = build_vlm(spec).eval()
    fill_from_hf(model, HFCheckpoint(hf_dir))
    prompts = [PromptInputs(*p) for p in prompts_raw]
    sampled = SamplingParams(temperature=1.2, top_p=0.9, top_k=50, max_new_tokens=16)
    greedy = SamplingParams(greedy=True, max_new_tokens=16)
    out = {}
    for packed in (True, False):
        engine = MegatronEngine(model, max_seq_len=40, eos_ids=EOS, packed_weights=packed)
        s, g = engine.generate(prompts, 3, sampled, seed=11), engine.generate(prompts, 2, greedy, seed=0)
        out[packed] = dict(s=s.response_ids.tolist(), sl=s.lengths.tolist(), slp=s.logprobs.tolist(),
                           g=g.response_ids.tolist(), gl=g.lengths.tolist())
    same_len = [prompts[0], PromptInputs(prompts[2].input_ids[:7], None, None)]  # no left padding: no mask
    fast, plain = (MegatronEngine(model, max_seq_len=40, eos_ids=[]) for _ in range(2))
    plain.shared_cache = False  # megatron's own static cache, prompt rows copied to their samples
    out["unpadded"] = [(o.response_ids.tolist(), o.logprobs.tolist())
                       for o in (e.generate(same_len, 3, sampled, seed=5) for e in (fast, plain))]
    linears = [m for m in model.modules() if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")]
    out["restored"] = not any("_forward_impl" in vars(m) or "forward" in vars(m) for m in linears)
    out["tp1_forward"] = _tp1_forward_equals_megatron_forward(model)
    for lean in (False, True):  # the module breakdown is megatron's forward; the lean step is one part
        engine = MegatronEngine(model, max_seq_len=40, eos_ids=[], lean_decode=lean)
        with profile_decode(engine) as prof:
            engine.generate(prompts, 2, greedy, seed=0)
        out["profile", lean] = dict(steps=prof.steps, parts=[c for c, _, _ in prof.table()])
    return out


def _tp1_forward_equals_megatron_forward(model):
    """At TP=1 the packed layers replace megatron's whole forward: equal to megatron's forward on the same packed
    matmul (bit for bit), and to the plain matmul up to float rounding, for column (qkv with bias, output layer)
    and row layers (projection, fc2)."""
    from megatron_papo.rollout.fast_decode import _PackedForward, packed_linears

    linears = [m for m in model.language_model.modules()
               if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")]
    g = torch.Generator().manual_seed(3)
    xs = {id(m): torch.randn(1, 5, m.weight.shape[1], generator=g) for m in linears}
    with torch.inference_mode():
        plain = {id(m): m(xs[id(m)]) for m in linears}
        with packed_linears(model.language_model, rows_hint=5):
            replaced = all(isinstance(vars(m).get("forward"), _PackedForward) for m in linears)
            fast = {id(m): m(xs[id(m)]) for m in linears}
            for m in linears:
                del m.forward  # megatron's forward around the same packed matmul
            packed = {id(m): m(xs[id(m)]) for m in linears}
    for m in linears:
        (f, fb), (p, pb), (q, qb) = fast[id(m)], packed[id(m)], plain[id(m)]
        assert torch.equal(f, p) and (fb is pb) and (fb is qb), type(m).__name__
        torch.testing.assert_close(f, q, atol=1e-5, rtol=1e-5)
    return replaced


def test_tp1_packed_forward_replaces_and_equals_megatron_forward(results):
    assert results["tp1_forward"], "at TP=1 every linear layer's forward is the packed one during generate"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from multirank import run_multirank
    from test_rollout import _prompts

    hf_dir = str(tmp_path_factory.mktemp("hf"))
    make_hf_model(hf_dir)
    return run_multirank(_body, world_size=1, args=(hf_dir, _prompts()), tp=1, pp=1, timeout=300)[0]


@pytest.mark.parametrize("packed", [True, False])
def test_outputs_equal_those_pinned_before_the_speed_work(results, packed):
    r = results[packed]
    assert r["s"] == PINNED_SAMPLED and r["sl"] == PINNED_SAMPLED_LENGTHS
    assert r["g"] == PINNED_GREEDY and r["gl"] == PINNED_GREEDY_LENGTHS


def test_prepacked_log_probs_equal_plain_ones(results):
    torch.testing.assert_close(torch.tensor(results[True]["slp"]), torch.tensor(results[False]["slp"]),
                               atol=1e-5, rtol=1e-5)
    assert results["restored"], "the layers' matmul hook must be restored after generate"


def test_unpadded_prompts_equal_megatron_cache_path(results):
    (fast_ids, fast_lp), (plain_ids, plain_lp) = results["unpadded"]
    assert fast_ids == plain_ids
    torch.testing.assert_close(torch.tensor(fast_lp), torch.tensor(plain_lp), atol=1e-5, rtol=1e-5)


def test_decode_profile_accounts_every_step(results):
    p, lean = results["profile", False], results["profile", True]
    assert p["steps"] == 16 and lean["steps"] == 16
    for part in ("output layer (vocab matmul)", "linear layers (qkv, proj, fc1, fc2)",
                 "core attention (scores, softmax, values)", "sampling (+ broadcast to stages)"):
        assert part in p["parts"], p["parts"]
    assert "lean decode step (all layers, output layer)" in lean["parts"], lean["parts"]


def test_packed_linear_matches_float64_reference():
    from megatron_papo.platform.decode_accel import pack_linear, packed_linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    packed = pack_linear(w, rows_hint=8)
    if packed is None:
        pytest.skip("this torch build has no prepacked CPU linear")
    for shape in [(1, 64), (5, 64), (3, 7, 64)]:
        x = torch.randn(*shape, generator=g)
        want = x.double() @ w.double().t() + b.double()
        got = packed_linear(x, packed, b)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_linear(x, packed), (x.double() @ w.double().t()).float(),
                                   atol=1e-5, rtol=1e-5)
    assert pack_linear(w.double()) is None  # a dtype without the prepacked path: the caller keeps its matmul


def test_graph_buckets_pick_the_smallest_bucket_that_fits():
    from megatron_papo.platform.decode_accel import GraphBuckets, capture

    buckets = GraphBuckets(max_rows=32)
    assert buckets.sizes == [1, 2, 4, 8, 16, 24, 32]
    assert [buckets.bucket(b) for b in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 24, 32]
    assert buckets.bucket(33) is None and buckets.padding(33) == 0  # larger than any bucket: eager
    assert buckets.padding(9) == 7
    assert GraphBuckets(6, sizes=[6, 3]).sizes == [3, 6]
    with pytest.raises(ValueError, match="max_rows"):
        GraphBuckets(0)
    with pytest.raises(ValueError, match="sizes"):
        GraphBuckets(4, sizes=[0])
    assert capture(lambda: torch.zeros(1), torch.device("cpu")) is None  # no graphs here: run eagerly
