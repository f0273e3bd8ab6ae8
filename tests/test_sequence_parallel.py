"""``parallel.sequence_parallel``: an RL step at TP=2 with sequence parallelism equals the same step without it.

Two ranks, TP=2, the tiny VLM from the same initial weights: one real RL step (rollout through the KV-cache
engine, old log-probs recomputed through megatron's schedule, reference KL, PAPO's masked view, the update), with
padded rows and with packed micro-batches (``thd``), and the tiny Qwen3-VL (DeepStack). The rollout engine runs the policy without sequence
parallelism (same rollouts), the scoring and update passes with it: a forward pre-hook on the first decoder layer
records the sequence length each forward sees, which proves the split happened (S/2 per rank) while training and
not while decoding. Loss, gradient norm and the updated weights must agree to float32 round-off.
"""

from __future__ import annotations

import math

import pytest
import torch

from multirank import run_multirank

KEYS = ("actor/loss", "actor/pg_loss", "actor/ref_kl", "actor/perception_kl", "actor/entropy", "actor/grad_norm")


def _step(root: str, init: str, sp: bool, *sets: str) -> dict:
    from test_train import _build, _params, _rl_steps

    run = _build(root, init, "parallel.tensor_model_parallel_size=2", f"parallel.sequence_parallel={sp}",
                 "rollout.recompute_old_logprobs=true", "training.prefix_scoring=false", *sets)
    vlm = run.ctx.policy.module
    seen = []                                          # (grad enabled, sequence length) per forward of layer 0
    vlm.language_model.decoder.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((torch.is_grad_enabled(), kwargs["hidden_states"].shape[0])),
        with_kwargs=True)
    before = _params(run)
    metrics = _rl_steps(run, 1)[0]
    after = _params(run)
    return {"metrics": metrics, "weights": after, "change": max((after[k] - before[k]).abs().max().item()
                                                                for k in before),
            "seen": seen, "config_sp": vlm.config.sequence_parallel,
            "ref_sp": run.ctx.reference.config.sequence_parallel if run.ctx.reference is not None else None}


def _body(rank, world, root, init):
    packed = ("training.max_tokens_per_micro_batch=300",)
    qwen3 = ("model.preset=qwen3-vl-tiny",)         # DeepStack features are split along the sequence too
    return {"padded": (_step(root, init, False), _step(root, init, True)),
            "packed": (_step(root, init, False, *packed), _step(root, init, True, *packed)),
            "qwen3": (_step(root, f"{init}_qwen3", False, *qwen3), _step(root, f"{init}_qwen3", True, *qwen3))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    return run_multirank(_body, 2, args=(str(root), str(root / "init")), timeout=300)


@pytest.mark.parametrize("layout", ["padded", "packed", "qwen3"])
def test_sequence_parallel_step_equals_tensor_parallel_step(results, layout):
    for rank, per_rank in enumerate(results):
        plain, sp = per_rank[layout]
        assert sp["config_sp"] is True and plain["config_sp"] is False     # the switch is restored after decoding
        assert sp["ref_sp"] is False                                        # inference-only copies run without it
        assert sp["change"] > 1e-5
        a, b = plain["metrics"], sp["metrics"]
        assert a["reward/mean"] == b["reward/mean"], "different rollouts"
        for k in KEYS:
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), f"rank {rank} {k}: {a[k]} vs {b[k]}"
        for name, w in plain["weights"].items():
            torch.testing.assert_close(sp["weights"][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["padded", "packed", "qwen3"])
def test_training_forwards_split_the_sequence_and_decoding_does_not(results, layout):
    plain, sp = results[0][layout]
    assert len(plain["seen"]) == len(sp["seen"])
    decode = [(p, s) for (g, p), (_, s) in zip(plain["seen"], sp["seen"]) if not g and p == 1]
    assert decode and all(s == 1 for _, s in decode)                     # one token per step, not split
    train = [(p, s) for (g, p), (_, s) in zip(plain["seen"], sp["seen"]) if g]
    assert train and all(s * 2 == p for p, s in train), train[:4]        # S/2 per rank under SP
