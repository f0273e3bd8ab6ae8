"""Sequence parallelism (``parallel.sequence_parallel``): who uses it.

Under sequence parallelism the activations between tensor-parallel blocks (norms, residual adds, dropout) are
split along the sequence across the tensor-parallel ranks: column-parallel linears all-gather their input,
row-parallel linears reduce-scatter their output, and megatron's ``finalize_model_grads`` sums the norm weights'
gradients over the tensor-parallel group. It saves activation memory for the backward pass, so only the trained
policy is built with it; inference-only copies (the reference model, ``evaluate``, ``generate``) are not
(:func:`model_sequence_parallel`), which also lets a checkpoint trained with it load at any TP size.

The rollout engine decodes one token per row and step, which cannot be split over the sequence, so it runs the
policy's weights without sequence parallelism: ``without_sequence_parallel`` lives in
``megatron_papo.models.common.sequence_parallel`` (the rollout imports it from there) and is re-exported here.
tests/test_sequence_parallel.py checks TP2 with = TP2 without through a real RL step.
"""

from __future__ import annotations

from megatron_papo.models.common.sequence_parallel import without_sequence_parallel  # noqa: F401 (old path)


def model_sequence_parallel(cfg, trainable: bool) -> bool:
    """Whether a model built for this run splits activations along the sequence (the trained policy only)."""
    return bool(trainable and cfg.parallel.sequence_parallel)
