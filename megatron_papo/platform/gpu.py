"""NVIDIA GPU generations and which FP8 recipe each can run (Transformer Engine's rules, checked before building).

Compute capability -> generation, and per FP8 recipe the generations Transformer Engine runs it on:

| recipe       | TE scaling                              | runs on                                   |
|--------------|-----------------------------------------|-------------------------------------------|
| `delayed`    | per-tensor, amax history (DelayedScaling)| Ada (8.9), Hopper (9.0), Blackwell (10.x+) |
| `tensorwise` | per-tensor, current (Float8CurrentScaling)| Ada, Hopper, Blackwell                     |
| `blockwise`  | 1x128 / 128x128 blocks (Float8BlockScaling)| Hopper, with CUDA >= 12.9                 |
| `mxfp8`      | 32-element blocks, E8M0 scales (MXFP8)  | data-centre Blackwell (10.x, 11.x)        |

A recipe the GPU cannot run is a one-line ``ValueError`` naming the GPU's generation and the recipes it can run
(:func:`check_fp8_recipe`); the rule itself (:func:`fp8_recipe_support`) takes the capability and CUDA version as
arguments, so it is tested on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")

# (major, minor) -> generation; a capability not listed takes the entry of its major version
_GENERATIONS = {
    (6, 0): "Pascal", (6, 1): "Pascal", (7, 0): "Volta", (7, 2): "Volta", (7, 5): "Turing",
    (8, 0): "Ampere", (8, 6): "Ampere", (8, 7): "Ampere", (8, 9): "Ada Lovelace", (9, 0): "Hopper",
    (10, 0): "Blackwell", (10, 3): "Blackwell", (11, 0): "Blackwell", (12, 0): "Blackwell (GeForce/RTX)",
    (12, 1): "Blackwell (GeForce/RTX)",
}
_BY_MAJOR = {6: "Pascal", 7: "Volta", 8: "Ampere", 9: "Hopper", 10: "Blackwell", 11: "Blackwell",
             12: "Blackwell (GeForce/RTX)"}

# recipe -> (what it needs, in words; predicate on (capability, cuda version))
_RULES = {
    "delayed": ("Ada, Hopper or Blackwell (compute capability >= 8.9)", lambda cc, cuda: cc >= (8, 9)),
    "tensorwise": ("Ada, Hopper or Blackwell (compute capability >= 8.9)", lambda cc, cuda: cc >= (8, 9)),
    "blockwise": ("Hopper (compute capability 9.x) with CUDA >= 12.9",
                  lambda cc, cuda: cc[0] == 9 and cuda >= (12, 9)),
    "mxfp8": ("data-centre Blackwell (compute capability 10.x or 11.x)", lambda cc, cuda: 10 <= cc[0] < 12),
}


def generation(capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``'Hopper'``; unknown future majors are named by their capability."""
    cc = tuple(capability)
    name = _GENERATIONS.get(cc) or _BY_MAJOR.get(cc[0])
    if name is None:
        name = "newer than Blackwell" if cc[0] > 12 else "pre-Pascal"
    return f"{name} (compute capability {cc[0]}.{cc[1]})"


def _version(text: Optional[str]) -> tuple[int, int]:
    parts = (text or "0.0").split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def fp8_recipe_support(recipe: str, capability: tuple[int, int], cuda: str | None) -> tuple[bool, str]:
    """(runs, why not) for ``recipe`` on a GPU of ``capability`` with CUDA ``cuda`` (e.g. "12.9")."""
    if recipe not in _RULES:
        return False, f"model.fp8_recipe={recipe!r} is unknown; use one of {FP8_RECIPES}"
    needs, ok = _RULES[recipe]
    cc, cu = tuple(capability), _version(cuda)
    if ok(cc, cu):
        return True, ""
    can = [r for r in FP8_RECIPES if _RULES[r][1](cc, cu)]
    instead = f"use model.fp8_recipe={' / '.join(can)}" if can else "this GPU runs no FP8 recipe: set model.fp8=null"
    return False, (f"model.fp8_recipe={recipe} needs {needs}; this GPU is {generation(cc)} with CUDA {cuda}; "
                   f"{instead}")


def device_capability() -> Optional[tuple[int, int]]:
    """Compute capability of the current GPU (None without one)."""
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def check_fp8_recipe(recipe: str) -> None:
    """Raise a one-line ValueError when the visible GPU cannot run ``recipe`` (call only where a GPU is present)."""
    ok, why = fp8_recipe_support(recipe, device_capability() or (0, 0), torch.version.cuda)
    if not ok:
        raise ValueError(why)


# dense bf16 peak FLOP/s by device name (datasheet figures, no sparsity); the first matching key wins
_BF16_PEAK = (("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
              ("H800", 989e12), ("H20", 148e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
              ("L40", 181e12), ("L4", 121e12))


def bf16_peak_flops(name: Optional[str] = None) -> Optional[float]:
    """Datasheet dense bf16 peak of the current (or named) GPU, None when unknown or without a GPU."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    return next((peak for key, peak in _BF16_PEAK if key in name), None)


def device_name() -> str:
    """The GPU's name and generation, or 'CPU'."""
    if not torch.cuda.is_available():
        return "CPU"
    return f"{torch.cuda.get_device_name()}, {generation(device_capability())}, CUDA {torch.version.cuda}"
