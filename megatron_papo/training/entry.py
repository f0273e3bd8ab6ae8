"""``megatron-papo train``: the embedded CPU demo config, ``--dry-run`` and the real run."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_papo.config import Config, to_dict


def default_config_tree() -> dict:
    """The embedded demo: a tiny VLM (2 layers, hidden 64) answers synthetic counting / colour questions about
    56-px images (one shape per merged image token) with PAPO-G on CPU; a few minutes on 2 cores.

    A supervised warm-start on the tasks' worked answers comes first (the run says so): a random tiny model never
    produces ``<think>...</think> \\boxed{}`` by chance, and RL needs reward variance within groups. 200 steps leave
    the model reading the image a little (held-out accuracy about 0.2-0.3 at the start of RL); RL then raises the
    reward by reading it better. At the end the policy is evaluated on 64 held-out questions (another synthetic
    seed) with the real, the PAPO-masked and a black image, printed just before the summary line. Measured on the
    2-core machine (68 s wall idle, 4.5 min under heavy load): mean reward 0.258 -> 0.537, held-out accuracy
    real 0.531 / masked 0.277 / black 0.246 (chance 0.25).
    """
    return {
        "model": {"preset": "tiny"},
        "data": {"train_shards": "runs/demo/data/train", "synthetic_if_missing": True, "synthetic_samples": 2000,
                 "tokenizer": {"type": "sentencepiece", "path": None}, "max_prompt_length": 256,
                 "shuffle_buffer": 200, "min_pixels": 56 * 56, "max_pixels": 84 * 84,
                 "val_shards": "runs/demo/data/heldout"},
        "rollout": {"n": 8, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16},
        "algorithm": {"preset": "papo_g"},
        # 1e-3 keeps RL stable here (2e-3 drifts away from the reference and forgets the image within 20 steps)
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01, "clip_grad": 1.0, "warmup_steps": 0},
        "training": {"rl_steps": 60, "prompts_per_step": 16, "prompts_per_update": 16, "micro_batch_size": 32,
                     "warmup_sft_steps": 200, "seed": 1234, "cpu_threads": 1,
                     # the final policy's image reliance on 64 held-out questions (another synthetic seed)
                     "eval_interval": 60, "eval_limit": 64, "eval_k": 4},
        "checkpoint": {"dir": "runs/demo/checkpoints", "save_interval": 0, "keep_last": 2, "resume": None},
        "logging": {"tensorboard_dir": "runs/demo/tensorboard", "log_interval": 1, "progress": True},
    }


def train(cfg: Config, dry_run: bool = False) -> int:
    """Run training (or only validate and describe the layout with ``dry_run``); returns the exit code: 0 done,
    ``EXIT_PREEMPTED`` (75) stopped by a signal after saving its checkpoint."""
    if dry_run:
        from megatron_papo.training.layout import describe_layout

        print(describe_layout(cfg))
        return 0
    from megatron_papo.platform import set_cpu_threads
    from megatron_papo.training.logging import is_logging_rank
    from megatron_papo.training.trainer import run_training

    set_cpu_threads(cfg.training.cpu_threads)

    if cfg.checkpoint.dir and is_logging_rank():
        out = Path(cfg.checkpoint.dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))   # the resolved config of the run
    result = run_training(cfg)
    from megatron_papo.platform import shutdown
    from megatron_papo.training.preemption import EXIT_PREEMPTED

    shutdown()
    return EXIT_PREEMPTED if result.get("signal") else 0
