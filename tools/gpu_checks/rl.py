"""Section 1 of the GPU check: bf16 RL steps of the tiny VLM through the trainer (NCCL, world size 1): finite
losses; the first step's loss against an fp32 CPU run of the same rollouts (a subprocess without the GPU, run as
``tools/gpu_check.py --cpu-reference DIR``) within bf16 tolerance; save after step 1 + resume in a fresh run =
step 2 of the uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

from .common import ENTRY, FAIL, OK, ROOT, STATE, close, row


def rl_config(root: str, dtype: str, *sets: str):
    from megatron_papo.config import load_config
    from megatron_papo.training.entry import default_config_tree

    return load_config(None, [
        f"data.train_shards={root}/data", "data.synthetic_samples=24", "data.shuffle_buffer=0", "rollout.n=4",
        "rollout.max_new_tokens=6", "training.prompts_per_step=2", "training.prompts_per_update=2",
        "training.micro_batch_size=4", "training.warmup_sft_steps=0", "optimizer.lr=1e-3",
        "rollout.recompute_old_logprobs=true", f"model.params_dtype={dtype}", f"checkpoint.dir={root}/ckpt",
        "checkpoint.keep_last=0", "logging.tensorboard_dir=null", "logging.progress=false", *sets],
        base=default_config_tree())


def build_rl_run(root: str, dtype: str, init: str, *sets: str):
    """A run whose policy (and reference) start from the weights at ``init`` (written there first if absent)."""
    from megatron_papo.training.checkpoint import load_checkpoint, save_checkpoint
    from megatron_papo.training.trainer import build_run

    run = build_run(rl_config(root, dtype, *sets))
    ctx = run.ctx
    if os.path.isdir(os.path.join(init, "step_0")):
        load_checkpoint(os.path.join(init, "step_0"), [ctx.policy])
    else:
        save_checkpoint(init, 0, [ctx.policy])
    if ctx.reference is not None:
        ctx.reference.load_state_dict(ctx.policy.module.state_dict())
    return run


KEYS = ("actor/loss", "actor/entropy", "actor/perception_kl", "actor/grad_norm")


def vary_rewards() -> None:
    """A deterministic reward of the response text: a random tiny model never answers correctly, and the loss and
    gradients only carry the model's numerics when groups have reward variance (as tests/test_train.py does)."""
    from megatron_papo.training import rl_step as rl

    rl.get_reward = lambda name: (lambda text, answer: {"overall": (len(text) % 3) / 2.0,
                                                        "accuracy": (len(text) % 3) / 2.0, "format": 0.0})


def cpu_reference(root: str) -> None:
    """(subprocess, no GPU) fp32 step 1 from the shared initial weights; writes its rollouts and metrics."""
    import torch

    from megatron_papo.platform import init_distributed
    from megatron_papo.training import rl_step as rl

    init_distributed()
    vary_rewards()
    run = build_rl_run(root, "float32", os.path.join(root, "init"), f"checkpoint.dir={root}/ckpt_ref")
    collected = {}
    real_collect = rl.collect

    def keep(ctx, reader, step):
        collected["out"] = real_collect(ctx, reader, step)
        return collected["out"]

    rl.collect = keep
    metrics = rl.rl_step(run.ctx, iter(run.reader), 1)
    torch.save(collected["out"], os.path.join(root, "rollouts.pt"))
    json.dump({k: float(metrics[k]) for k in KEYS if k in metrics}, open(os.path.join(root, "ref.json"), "w"))


def _replay_step(run, rollouts) -> dict:
    """Step 1 on given rollouts (the CPU reference's) instead of sampling new ones."""
    from megatron_papo.training import rl_step as rl

    real_collect = rl.collect
    rl.collect = lambda ctx, reader, step: rollouts
    try:
        return rl.rl_step(run.ctx, iter(run.reader), 1)
    finally:
        rl.collect = real_collect


def section_rl(args) -> None:
    import torch

    from megatron_papo.platform import has_gpu, max_memory_allocated, reset_peak_memory
    from megatron_papo.training.rl_step import rl_step
    from megatron_papo.training.trainer import resume, save

    dtype = "bfloat16" if has_gpu() else "float32"       # megatron's bf16 optimizer is GPU-only
    root = tempfile.mkdtemp(prefix="gpu_check_rl_")
    init = os.path.join(root, "init")
    vary_rewards()
    straight = build_rl_run(root, dtype, init)            # writes the initial weights everyone starts from
    STATE["rl_cfg"] = straight.ctx.cfg
    it = iter(straight.reader)
    reset_peak_memory()
    m = [rl_step(straight.ctx, it, 1)]
    save(straight, 1)                                     # the resume check below starts from here
    m.append(rl_step(straight.ctx, it, 2))
    STATE["rl_peak_bytes"] = max_memory_allocated()
    losses = [x.get("actor/loss", float("nan")) for x in m]
    row("1 rl", f"{dtype} steps 1-2 loss finite", " ".join(f"{v:.4f}" for v in losses), "",
        OK if all(math.isfinite(v) for v in losses) else FAIL)

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    subprocess.run([sys.executable, ENTRY, "--cpu-reference", root], env=env, check=True,
                   timeout=max(30, args.limits["1"] - 30))
    ref = json.load(open(os.path.join(root, "ref.json")))
    replay_run = build_rl_run(root, dtype, init, f"checkpoint.dir={root}/ckpt_replay")
    got = _replay_step(replay_run, torch.load(os.path.join(root, "rollouts.pt"), weights_only=False))
    for key, rel, abs_ in (("actor/loss", 0.05, 0.02), ("actor/entropy", 0.03, 0.02),
                           ("actor/perception_kl", 0.2, 0.01), ("actor/grad_norm", 0.1, 1e-4)):
        a, b = float(got.get(key, float("nan"))), float(ref.get(key, float("nan")))
        row("1 rl", f"step 1 {key.split('/')[1]} {dtype} vs fp32 CPU", f"{a:.5f}", f"{b:.5f} (rel {rel}, abs {abs_})",
            OK if close(a, b, rel, abs_) else FAIL)

    again = build_rl_run(root, dtype, init, "checkpoint.resume=auto")
    resume(again)
    resumed = rl_step(again.ctx, iter(again.reader), 2)
    tol = (1e-3, 1e-5) if has_gpu() else (0.0, 0.0)      # GPU kernels (atomics in backward) may reorder sums
    for key in ("reward/mean", "actor/loss", "actor/grad_norm"):
        a, b = float(resumed.get(key, float("nan"))), float(m[1].get(key, float("nan")))
        row("1 rl", f"resume at step 2: {key}", f"{a:.6f}", f"{b:.6f} uninterrupted",
            OK if close(a, b, *tol) or a == b else FAIL)
