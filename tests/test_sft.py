"""The supervised warm-start step packs like the RL update: with ``training.max_tokens_per_micro_batch`` its
micro-batches are token-budget packs (``thd``), and the step's NLL and gradients equal those of padded rows.

One rank, the tiny VLM from the same initial weights, the same 4 samples (prompt with image + worked answer):
padded rows (micro-batches of 3 rows) against packs at the smallest budget the config allows, which bins them
differently; gradients read from megatron DDP's gradient buffers after the step.
"""

from __future__ import annotations

import math

import torch

from multirank import run_multirank


def _sft(root: str, init: str, *sets: str) -> dict:
    import megatron_papo.training.sft as sft
    from test_train import _build

    run = _build(root, init, "training.prompts_per_step=4", "training.prompts_per_update=4",
                 "training.micro_batch_size=3", *sets)
    reader = iter(run.reader)
    samples = [next(reader) for _ in range(run.ctx.prompts_per_rank)]
    splits, build = [], sft.micro_batches
    sft.micro_batches = lambda *a, **kw: splits.append(build(*a, **kw)) or splits[-1]  # noqa: E731
    try:
        metrics = sft.sft_step(run.ctx, samples)
    finally:
        sft.micro_batches = build
    grads = {n: p.main_grad.clone() for n, p in run.ctx.policy.module.named_parameters() if p.requires_grad}
    rows = [mb.row_index.tolist() if mb.row_index is not None else None for mb in splits[0]]
    return {"metrics": metrics, "grads": grads, "rows": rows, "packed": splits[0][0].packed_seq_params is not None}


def _body(rank, world, root, init):
    budget = "training.max_tokens_per_micro_batch=262"      # data.max_prompt_length 256 + rollout.max_new_tokens 6
    return _sft(root, init), _sft(root, init, budget)


def test_packed_sft_step_equals_padded(tmp_path):
    padded, packed = run_multirank(_body, 1, args=(str(tmp_path), str(tmp_path / "init")), timeout=300)[0]
    assert not padded["packed"] and packed["packed"]
    assert len(padded["rows"]) == 2 and len(packed["rows"]) >= 2          # 3 + 1 rows vs token-budget packs
    assert sorted(i for rows in packed["rows"] for i in rows) == [0, 1, 2, 3]
    assert packed["rows"] != [[0, 1, 2], [3]]
    a, b = padded["metrics"], packed["metrics"]
    assert a["sft/nll"] > 0 and math.isclose(a["sft/nll"], b["sft/nll"], rel_tol=1e-5)
    assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
    scale = max(g.abs().max().item() for g in padded["grads"].values())
    assert scale > 0
    for name, g in padded["grads"].items():
        torch.testing.assert_close(packed["grads"][name], g, rtol=1e-4, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}")
