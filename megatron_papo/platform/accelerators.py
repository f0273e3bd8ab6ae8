"""Optional accelerators (Transformer Engine, NVIDIA apex): one start-up line instead of megatron's warnings.

Without them megatron-core 0.16.1 warns once per module that looks for them (about 14 lines before any output of
ours: fused optimizers, multi-tensor kernels, fused norms). They are optional: megatron falls back to torch
implementations, which is what runs on CPU and what the local layer spec uses on a GPU. ``megatron_papo._startup``
(installed when ``megatron_papo`` is imported, before any megatron module, and free of torch so ``--help`` stays
instant) hands megatron's warnings to :func:`consume`, which turns exactly those into one line saying what is
missing and what that means; every other warning is shown as usual.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

# the messages megatron-core 0.16.1 emits when Transformer Engine and/or apex cannot be imported
FALLBACK_WARNING = re.compile(r"(Transformer Engine and Apex are|Apex is) not installed")
NOTICE_PREFIX = "optional accelerators missing:"

_announced = False


def _importable(module: str) -> bool:
    """True when ``module`` imports (a module of the right name that is not the real one counts as missing)."""
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - a broken install is as missing as an absent one
        return False


def missing() -> list[str]:
    """Names of the optional accelerators that cannot be used here. ``apex.normalization`` rather than ``apex``:
    the registry's package called ``apex`` is an unrelated web toolkit."""
    out = []
    if not _importable("transformer_engine.pytorch"):
        out.append("Transformer Engine")
    if not _importable("apex.normalization"):
        out.append("NVIDIA apex")
    return out


def notice(names: list[str]) -> str:
    """The one line that replaces megatron's fallback warnings."""
    return (f"{NOTICE_PREFIX} {', '.join(names)} -> torch fallbacks (local layer spec, torch norms and AdamW, "
            "no FP8); expected on CPU, on a GPU see README section 'GPU' for installing them")


def _is_logging_rank() -> bool:
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return rank == "0"


def consume(message: str) -> bool:
    """True when ``message`` is one of megatron's accelerator-fallback warnings: the first one prints the notice
    (on the logging rank), all are swallowed. Called by ``megatron_papo._startup``'s warning hook."""
    global _announced
    if not FALLBACK_WARNING.search(message):
        return False
    if not _announced and _is_logging_rank():
        print(notice(missing() or ["Transformer Engine or NVIDIA apex"]), file=sys.stderr, flush=True)
    _announced = True
    return True
