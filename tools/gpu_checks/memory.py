"""Section 4 of the GPU check: peak CUDA memory of section 3's step next to an estimate, and of section 1's RL step
next to the memory plan's figure (training/memory_plan.py; 'plan unavailable' where it is absent)."""

from __future__ import annotations

from .common import OK, SKIP, STATE, row


def _memory_plan_total(cfg):
    """The memory plan's total in bytes for ``cfg`` (training.memory_plan, built elsewhere), or a reason."""
    try:
        from megatron_papo.training import memory_plan
    except ImportError:
        return None, "plan unavailable (training.memory_plan absent)"
    fn = next((getattr(memory_plan, n) for n in ("memory_plan", "plan_memory", "plan") if hasattr(memory_plan, n)),
              None)
    try:
        plan = fn(cfg)
        total = plan.get("total") if isinstance(plan, dict) else getattr(plan, "total_bytes", None) or (
            getattr(plan, "total_gb", 0) * 2**30)
        return float(total), "memory plan"
    except Exception as e:  # noqa: BLE001 - the plan's API may differ; the check still reports the peak
        return None, f"plan unavailable ({type(e).__name__})"


def section_memory(args) -> None:
    from megatron_papo.platform import has_gpu

    gib = 2**30
    if not has_gpu():
        row("4 memory", "peak CUDA memory", "n/a on CPU", "", SKIP)
        return
    if "stack" in STATE:
        peak, est = STATE["stack"]
        note = "" if 0.5 * est <= peak <= 1.5 * est else " (outside +-50% of the estimate)"
        row("4 memory", "7B-shaped stack step: peak", f"{peak / gib:.2f} GiB{note}",
            f"{est / gib:.2f} GiB own estimate", OK)                 # a measurement: the plan is judged by it
    if "rl_peak_bytes" in STATE:
        total, what = _memory_plan_total(STATE["rl_cfg"])
        ref = f"{total / gib:.3f} GiB {what}" if total else what
        row("4 memory", "RL step (tiny VLM): peak", f"{STATE['rl_peak_bytes'] / gib:.3f} GiB", ref, OK)
