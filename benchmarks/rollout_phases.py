"""Prefill / decode split of one generation call, on both sides of ``rollout_throughput.py``.

- transformers ``generate``: forward hooks on the model time its first forward (the prefill of the whole prompt
  batch, cache filled, first token's logits); everything after it (decode forwards, sampling, bookkeeping) is
  the decode phase.
- the engine: its ``_prefill`` (every admission of prompts, chunks of ``prefill_batch_size``) is timed; the rest
  of ``generate`` is the decode phase.

Wall-clock and process CPU seconds of each phase, inside the same timed runs as the table (so they add up to
its figures; on a shared machine the CPU seconds are the steadier ones).
``prefill_gflop``: the matmul FLOPs of the plain prefill of P prompts x L tokens (every layer on every position:
qkv, projection, MLP; causal attention scores and values; the output layer on the last position only), the same
numerator for both sides; the engine's last layer runs on the last position only (``rollout/prefill.py``), so it
computes ~1/num_layers less of the linear part than this count.

Legend: P prompts, L prompt tokens, h hidden, I MLP width, q / kv query / key-value widths, V vocabulary.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


def prefill_gflop(cfg, prompts: int, prompt_len: int) -> float:
    """GFLOP of the plain prefill; ``cfg``: the transformers text config (hidden_size, intermediate_size, ...)."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_token = h * (q + 2 * kv) + q * h + h * 2 * i + i * h  # MACs of qkv, projection, fc1 (gate + up), fc2
    linear = 2 * per_token * prompts * prompt_len * layers
    attention = 2 * 2 * q * prompts * layers * prompt_len * (prompt_len + 1) // 2  # causal q.k and p.v
    logits = 2 * h * cfg.vocab_size * prompts
    return (linear + attention + logits) / 1e9


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@contextmanager
def hf_prefill(model, seconds: list):
    """Appends to ``seconds`` the (wall, CPU) seconds of the first forward of ``model`` inside the block (one
    ``generate``)."""
    start = []

    def pre(module, args):
        if not start:
            start.append(_now())

    def post(module, args, out):
        if len(start) == 1:
            start.append(_now())

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    seconds.append(tuple(b - a for a, b in zip(*start)))


@contextmanager
def engine_prefill(engine, seconds: list):
    """Appends to ``seconds`` the (wall, CPU) seconds the engine spent in ``_prefill`` inside the block (one
    ``generate``)."""
    prefill, spent = engine._prefill, [0.0, 0.0]

    def timed(*args, **kwargs):
        start = _now()
        try:
            return prefill(*args, **kwargs)
        finally:
            spent[:] = [s + b - a for s, a, b in zip(spent, start, _now())]

    engine._prefill = timed
    try:
        yield
    finally:
        del engine._prefill
    seconds.append(tuple(spent))
