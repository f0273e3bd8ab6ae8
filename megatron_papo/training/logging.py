"""Run logging: tensorboard scalars, one concise console line per step, progress bars, the collapse warning.

Only the logging rank writes (the last rank: it sits on the last pipeline stage, where the loss metrics live).
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch.distributed as dist

from megatron_papo.algorithms.metrics import CollapseDetector

# metrics shown on the console line, in order, with their short names
_CONSOLE = (("reward/mean", "reward"), ("reward/accuracy", "acc"), ("actor/perception_kl", "kl_prcp"),
            ("actor/ref_kl", "kl_ref"), ("vppo/dependency", "dep"), ("vppo/token_fraction", "kept"),
            ("actor/pg_clipfrac", "clip"), ("actor/grad_norm", "gnorm"),
            ("rollout/response_length", "len"), ("data/skipped", "skipped"), ("rewards/timed_out", "timeouts"),
            ("time/step", "s/step"), ("time/rollout", "roll"),
            ("time/scoring_old", "old"), ("time/scoring_masked", "mask"), ("time/scoring_ref", "ref"),
            ("time/update", "upd"), ("perf/tflops_per_gpu", "TFLOP/s"), ("perf/mfu", "mfu"))


def run_directory(tensorboard_dir: str) -> str:
    """``<tensorboard_dir>/run-<date>-<time>[-k]``: each run (and each resumed start) its own tensorboard run."""
    import os
    import time

    base = os.path.join(tensorboard_dir, time.strftime("run-%Y%m%d-%H%M%S"))
    path, k = base, 1
    while os.path.exists(path):
        path, k = f"{base}-{k}", k + 1
    return path


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


class RunLogger:
    def __init__(self, tensorboard_dir: Optional[str], log_interval: int = 1, progress: bool = True):
        self.active = is_logging_rank()
        self.log_interval, self.progress = max(1, log_interval), progress
        self.writer = None
        self.run_dir = None
        if self.active and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir = run_directory(tensorboard_dir)
            self.writer = SummaryWriter(self.run_dir)
        self.collapse = CollapseDetector()
        self.printed_signs: set[str] = set()

    def info(self, msg: str) -> None:
        if self.active:
            print(msg, flush=True)

    def note(self, msg: str, step: int = 0) -> None:
        """A warning worth keeping with the run: one console line and a tensorboard text entry (``warnings``)."""
        if not self.active:
            return
        print(f"WARNING: {msg}", flush=True)
        if self.writer is not None:
            self.writer.add_text("warnings", msg, step)
            self.writer.flush()

    def log_step(self, step: int, total: int, metrics: dict) -> None:
        """Scalars to tensorboard, the collapse check, and a console line every ``log_interval`` steps."""
        if not self.active:
            return
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, float(v), step)
            self.writer.flush()
        plain = {k.split("/", 1)[-1]: v for k, v in metrics.items() if k.startswith("actor/")}
        warning = self.collapse.update(plain, step)
        if warning and not set(self.collapse.new_signs) <= self.printed_signs:   # each sign printed once per run
            self.printed_signs.update(self.collapse.new_signs)
            print(f"WARNING: {warning} (each sign is printed once; the signals stay in tensorboard)", file=sys.stderr, flush=True)
        if warning and self.writer is not None:
            self.writer.add_text("warnings", warning, step)
        if step % self.log_interval == 0 or step == total:
            parts = [f"{short} {float(metrics[k]):.4g}" for k, short in _CONSOLE if k in metrics]
            print(f"step {step}/{total} | " + " | ".join(parts), flush=True)

    def bar(self, iterable: Iterable, total: int, desc: str):
        """A progress bar for a long phase (on the logging rank, when enabled)."""
        if not (self.active and self.progress):
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
