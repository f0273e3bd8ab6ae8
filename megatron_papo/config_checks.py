"""Whole-config checks that need no model: finite numbers, paths that cannot work, ranges of seeds.

Called by ``config.validate`` so every entry point (train, --dry-run, tools) refuses these before anything is
built, with one line naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

SEED_MAX = 2**32 - 1   # numpy's seeding range; torch and random accept it too


def _leaves(node, prefix: str = ""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def check_config(cfg) -> None:
    from megatron_papo.config import ConfigError

    for name, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}: {value} is not a finite number; set a finite value")
    if not 0 <= cfg.training.seed <= SEED_MAX:
        raise ConfigError(f"training.seed must be in [0, {SEED_MAX}], got {cfg.training.seed}")
    ckpt = cfg.checkpoint.dir
    if ckpt and Path(ckpt).exists() and not Path(ckpt).is_dir():
        raise ConfigError(f"checkpoint.dir: {ckpt!r} is a file, not a directory; point it at a directory "
                          "(created if missing)")
    tb = cfg.logging.tensorboard_dir
    if tb and Path(tb).exists() and not Path(tb).is_dir():
        raise ConfigError(f"logging.tensorboard_dir: {tb!r} is a file, not a directory")
