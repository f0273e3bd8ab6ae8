"""Where a decode step's time goes: exclusive CPU time per part of the engine, from module hooks.

Used by ``rollout_throughput.py --profile``. Every module of a category gets forward pre/post hooks that keep a
stack of open parts and charge each part its own (exclusive) CPU time: a transformer layer is charged its
residual adds and dispatch only, its attention and MLP are their own rows, and so on. The engine's sampling
(``_pick``) and its decode loop are wrapped the same way; what the loop spends outside the model and the
sampler is its bookkeeping. Process CPU time (``time.process_time``), not wall-clock, so other processes on a
shared machine inflate it much less. Only the decode steps are counted in the table; the prefill (which runs
before the loop) is timed as a whole (``prefill_seconds``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


def _category(name: str, module) -> str | None:
    kind = type(module).__name__
    if name.endswith("output_layer"):
        return "output layer (vocab matmul)"
    if kind in ("ColumnParallelLinear", "RowParallelLinear"):
        return "linear layers (qkv, proj, fc1, fc2)"
    if kind == "SDPAttention":
        return "core attention (scores, softmax, values)"
    if "Rotary" in kind:
        return "rotary table (cos/sin of the step's positions)"
    if "Norm" in kind:
        return "norms"
    if kind == "RopeCachingSelfAttention" or kind == "SelfAttention":
        return "attention glue (qkv split, rotary apply, cache write)"
    if kind == "MLP":
        return "MLP glue (SwiGLU)"
    if kind == "TransformerLayer":
        return "layer glue (residual adds, dispatch)"
    if kind in ("GPTModel", "QwenVLModel") or name == "":
        return "model entry/exit (embedding lookup, logits slice)"
    return None


class StepProfile:
    """Exclusive CPU seconds per category while ``active``; ``steps`` counts decode steps."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.stack: list[list] = []  # [category, start, seconds of children]
        self.active = False
        self.steps = 0
        self.prefill_seconds = 0.0  # CPU seconds of the engine's prefills inside the block

    def enter(self, category: str) -> None:
        if self.active:
            self.stack.append([category, time.process_time(), 0.0])

    def leave(self) -> None:
        if not self.active or not self.stack:
            return
        category, start, children = self.stack.pop()
        spent = time.process_time() - start
        self.seconds[category] += spent - children
        if self.stack:
            self.stack[-1][2] += spent

    def table(self) -> list[tuple[str, float, float]]:
        """(category, ms per step, share) rows, largest first."""
        total = sum(self.seconds.values()) or 1.0
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        return [(c, 1e3 * s / max(1, self.steps), s / total) for c, s in rows]


def _wrap(obj, attr: str, prof: StepProfile, category: str, on_call=None):
    original = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        if on_call is not None:
            on_call()
        prof.enter(category)
        try:
            return original(*args, **kwargs)
        finally:
            prof.leave()

    setattr(obj, attr, wrapped)


@contextmanager
def profile_decode(engine):
    """Profile the decode loop of every ``engine.generate`` inside the block; yields the ``StepProfile``."""
    prof = StepProfile()
    handles = []
    lean = engine.decode_forward == engine._lean_step
    for name, module in engine.stages.model.named_modules():
        cat = _category(name, module)
        # the lean step runs the VLM's forward hooks (not its pre-hooks) on its logits: no pair on the VLM then
        if cat is not None and not (lean and module is engine.stages.model):
            handles.append(module.register_forward_pre_hook(lambda m, a, c=cat: prof.enter(c)))
            handles.append(module.register_forward_hook(lambda m, a, o: prof.leave()))
    decode = engine._decode

    def profiled_decode(*args, **kwargs):
        prof.active = True
        prof.enter("engine bookkeeping (finish checks, compaction, loop)")
        try:
            return decode(*args, **kwargs)
        finally:
            prof.leave()
            prof.active = False

    prefill = engine._prefill

    def timed_prefill(*args, **kwargs):
        start = time.process_time()
        try:
            return prefill(*args, **kwargs)
        finally:
            prof.prefill_seconds += time.process_time() - start

    engine._decode, engine._prefill = profiled_decode, timed_prefill
    _wrap(engine, "_pick", prof, "sampling (+ broadcast to stages)", on_call=lambda: _count(prof))
    step = engine.decode_forward
    if lean:  # no module hooks fire inside the lean step: one part for all of it
        _wrap(engine, "decode_forward", prof, "lean decode step (all layers, output layer)")
    try:
        yield prof
    finally:
        for h in handles:
            h.remove()
        for attr in ("_decode", "_pick", "_prefill"):
            delattr(engine, attr)
        engine.decode_forward = step


def _count(prof: StepProfile) -> None:
    if prof.active:
        prof.steps += 1
