"""Published algorithm presets by name (numbers live once, in ``megatron_papo.config.ALGORITHM_PRESETS``)."""

from __future__ import annotations

import dataclasses

from megatron_papo.config import ALGORITHM_PRESETS, AlgorithmConfig


def preset_names() -> tuple[str, ...]:
    return tuple(ALGORITHM_PRESETS)


def algorithm_preset(name: str, **overrides) -> AlgorithmConfig:
    """The :class:`AlgorithmConfig` of preset ``name`` (grpo | dapo | papo_g | papo_d | vppo), with ``overrides`` on top."""
    if name not in ALGORITHM_PRESETS:
        raise ValueError(f"algorithm.preset: unknown preset {name!r}; choose one of {', '.join(ALGORITHM_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown AlgorithmConfig field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    fields = {k: list(v) if isinstance(v, list) else v for k, v in ALGORITHM_PRESETS[name].items()}  # own lists
    return AlgorithmConfig(**{**fields, "preset": name, **overrides})
