"""The lean decode step (``rollout.lean_decode``) against megatron's forward of the same step, on the same cache.

Every decode step of a ``generate`` call runs both (megatron's forward first, then the lean step, each writing
its own new key before reading the cache) and compares their logits: tiny Qwen2.5-VL (QKV bias, untied output
layer) and tiny Qwen3-VL (q / k norm, interleaved M-RoPE, tied output layer), float32 and float64, left-padded
prompts with an image, with and without a row cap (rows at different steps). A lean step with the rotary left
out must be caught by the same comparison. Tokens (greedy and sampled) are identical with lean decode on and off.
The trainer's setting: a forward hook on the VLM bans the vision special tokens (``training.banned_tokens``,
``<|vision_end|>`` included, which the engine itself does not ban); the lean step must apply it as megatron's
forward does (same logits, -inf entries included; same sampled tokens and log-probs).
"""

from __future__ import annotations

import pytest
import torch

from hf_tiny import IMG, VEND, VSTART, tiny_hf_config, tiny_qwen3_config
from vlm_helpers import PATCH_DIM

EOS = list(range(0, 240, 12))  # rows end at different steps, so refills under a cap mix steps


def _model(family, dtype):
    from megatron_papo.models import build_vlm, spec_from_hf_config

    config = tiny_hf_config() if family == "qwen2.5-vl" else tiny_qwen3_config(tied=True)
    model = build_vlm(spec_from_hf_config(config.to_dict()), params_dtype=dtype).to(dtype).eval()  # norms too
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # megatron zero/one-initialises biases and norms: randomise so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def _prompts(family, dtype):
    from megatron_papo.data.prompts import PromptInputs

    g = torch.Generator().manual_seed(1)
    txt = lambda n: torch.randint(0, 240, (n,), generator=g).tolist()  # noqa: E731
    img = [VSTART] + [IMG] * 8 + [VEND]
    pixels = torch.randn(32, PATCH_DIM[family], generator=g, dtype=dtype)
    return [PromptInputs(torch.tensor(txt(7)), None, None),
            PromptInputs(torch.tensor(txt(3) + img + txt(4)), pixels, torch.tensor([[1, 4, 8]])),
            PromptInputs(torch.tensor(txt(12)), None, None),
            PromptInputs(torch.tensor(txt(5)), None, None)]


class _Both:
    """An engine's decode step that runs megatron's forward and the lean step and records their difference."""

    def __init__(self, engine):
        self.engine, self.diffs, self.steps = engine, [], 0

    def __call__(self, ids, position_ids, ctx):
        ref = self.engine._megatron_step(ids, position_ids, ctx)
        out = self.engine._lean_step(ids, position_ids, ctx)
        fin = torch.isfinite(ref)  # -inf: banned tokens and vocabulary padding, the same entries in both
        same = torch.equal(fin, torch.isfinite(out))
        self.diffs.append(float((out - ref)[fin].abs().max() / ref[fin].abs().max()) if same else float("inf"))
        self.steps += 1
        return out


def _compare(model, prompts, max_rows, params):
    from megatron_papo.rollout import MegatronEngine

    engine = MegatronEngine(model, max_seq_len=40, eos_ids=EOS, max_rows=max_rows, lean_decode=True)
    both = engine.decode_forward = _Both(engine)
    engine.generate(prompts, 3, params, seed=11)
    return dict(lean=engine.lean_decode, worst=max(both.diffs), steps=both.steps,
                mixed=engine.last_stats["mixed_steps"])


def _tokens(model, prompts, lean, max_rows, params):
    from megatron_papo.rollout import MegatronEngine

    engine = MegatronEngine(model, max_seq_len=40, eos_ids=EOS, max_rows=max_rows, lean_decode=lean)
    out = engine.generate(prompts, 3, params, seed=11)
    return dict(lean=engine.lean_decode, ids=out.response_ids.tolist(), lengths=out.lengths.tolist(),
                logprobs=out.logprobs.tolist())


def _body(rank, world_size):
    from megatron_papo.rollout import SamplingParams
    from megatron_papo.rollout import lean_decode
    from megatron_papo.training.banned_tokens import ban_tokens

    sampled = SamplingParams(temperature=1.2, top_p=0.9, top_k=50, max_new_tokens=12)
    greedy = SamplingParams(greedy=True, max_new_tokens=12)
    out = {}
    for family in ("qwen2.5-vl", "qwen3-vl"):
        for dtype in (torch.float32, torch.float64):
            model, prompts = _model(family, dtype), _prompts(family, dtype)
            for cap in (0, 6):
                out[family, str(dtype), cap] = _compare(model, prompts, cap, sampled)
        model, prompts = _model(family, torch.float32), _prompts(family, torch.float32)
        for name, params in (("greedy", greedy), ("sampled", sampled)):
            for cap in (0, 6):
                out[family, name, cap] = [_tokens(model, prompts, lean, cap, params) for lean in (True, False)]
        handle = ban_tokens(model, [VEND])  # as the trainer does (build_model)
        try:
            out[family, "banned"] = _compare(model, prompts, 0, sampled)
            out[family, "banned", "tokens"] = [_tokens(model, prompts, lean, 0, sampled) for lean in (True, False)]
        finally:
            handle.remove()
        rotate, lean_decode.rotate = lean_decode.rotate, lambda t, cos, sin: t  # a lean step without rotary
        try:
            out[family, "no rotary"] = _compare(model, prompts, 0, greedy)
        finally:
            lean_decode.rotate = rotate
    return out


@pytest.fixture(scope="module")
def results():
    from multirank import run_multirank

    return run_multirank(_body, world_size=1, tp=1, pp=1, timeout=300)[0]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cap", [0, 6])
def test_lean_step_logits_equal_megatron_forward(results, family, dtype, cap):
    r = results[family, str(dtype), cap]
    assert r["lean"], "the tiny local-spec model at TP=1, PP=1 must get the lean step"
    assert r["steps"] >= 10
    assert r["worst"] <= (1e-6 if dtype == torch.float32 else 1e-13), r  # measured: 0.0 (bit for bit)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_row_cap_compares_steps_with_rows_at_different_steps(results, family):
    mixed = sum(results[family, str(dtype), 6]["mixed"] for dtype in (torch.float32, torch.float64))
    assert mixed > 0, "the row cap must produce steps with rows at different response steps"


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_comparison_catches_a_wrong_rotary(results, family):
    assert results[family, "no rotary"]["worst"] > 1e-3


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("name", ["greedy", "sampled"])
@pytest.mark.parametrize("cap", [0, 6])
def test_tokens_identical_with_and_without_lean_step(results, family, name, cap):
    lean, plain = results[family, name, cap]
    assert lean["lean"] and not plain["lean"]
    assert lean["ids"] == plain["ids"] and lean["lengths"] == plain["lengths"]
    torch.testing.assert_close(torch.tensor(lean["logprobs"]), torch.tensor(plain["logprobs"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_vlm_forward_hook_applies_to_the_lean_step(results, family):
    """The trainer's banned-token hook: logits equal megatron's (the banned entry -inf in both), the sampled tokens
    and log-probs equal with the lean step on and off, the banned token never sampled."""
    r = results[family, "banned"]
    assert r["lean"] and r["steps"] >= 10
    assert r["worst"] <= 1e-6, r
    lean, plain = results[family, "banned", "tokens"]
    assert lean["lean"] and not plain["lean"]
    assert lean["ids"] == plain["ids"] and lean["lengths"] == plain["lengths"]
    assert not any(VEND in row for row in lean["ids"])
    torch.testing.assert_close(torch.tensor(lean["logprobs"]), torch.tensor(plain["logprobs"]), atol=1e-6, rtol=0)
