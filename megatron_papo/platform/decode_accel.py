"""Device-specific accelerations of the decode step: prepacked CPU matmuls and CUDA-graph capture.

Both trade a one-off preparation for a cheaper repeated step, and both say "not here" by returning None so the
caller keeps its plain path:

- ``pack_linear`` / ``packed_linear``: on CPU, a linear layer's weight reordered once into oneDNN's blocked
  layout; each call then skips the per-call re-layout that a plain ``x @ w.t()`` pays. With a few rows per step
  (decoding) that re-layout dominates: on the benchmark's sizes the 32000-wide output layer runs ~2x faster.
  Same float32 arithmetic (no reduced-precision path), summed in a different order: results differ from
  ``x @ w.t()`` by float rounding only (~1e-6 relative, as two BLAS libraries do).
- ``GraphBuckets`` / ``capture``: on a CUDA device, a decode step recorded once per batch-size bucket (static
  shapes) and replayed; the bucket choice is plain Python, tested on CPU.

Legend: m rows (tokens) in a call, k input features, n output features.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class PackedWeight:
    """A weight ``[n, k]`` in oneDNN's layout for ``packed_linear``; ``source`` is the original tensor."""

    packed: torch.Tensor
    source: torch.Tensor


def _onednn_linear_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def pack_linear(weight: torch.Tensor, rows_hint: int = 32) -> PackedWeight | None:
    """``weight`` ``[n, k]`` prepacked for CPU matmuls of about ``rows_hint`` rows, or None where this backend
    has no prepacked path (a GPU tensor, a dtype oneDNN does not take, a build without oneDNN)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2:
        return None
    if not _onednn_linear_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(1, int(rows_hint)))
    except RuntimeError:  # an ISA or build without the reorder: keep the plain matmul
        return None
    return PackedWeight(packed, weight)


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[..., k]`` -> ``[..., n]``: ``x @ w.t() + bias`` with the prepacked weight."""
    flat = x.reshape(-1, x.shape[-1])  # [m, k]
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, weight.packed, bias, "none", [], "")  # [m, n]
    return out.view(*x.shape[:-1], out.shape[-1])


# --- CUDA graphs --------------------------------------------------------------------------------------------

class GraphBuckets:
    """Batch-size buckets for graph-captured decode steps: a step with b rows replays the graph of the smallest
    bucket >= b, its rows padded up to the bucket; more rows than the largest bucket run eagerly.

    sizes: the buckets (default 1, 2, 4, 8, then multiples of 8 up to ``max_rows``, as vLLM's capture sizes).
    """

    def __init__(self, max_rows: int, sizes: Sequence[int] | None = None):
        if max_rows < 1:
            raise ValueError(f"GraphBuckets: max_rows must be >= 1, got {max_rows}")
        if sizes is None:
            sizes = [s for s in (1, 2, 4) if s < max_rows] + list(range(8, max_rows + 8, 8))
        self.sizes = sorted({int(s) for s in sizes if 0 < int(s)})
        if not self.sizes:
            raise ValueError("GraphBuckets: sizes must hold at least one positive size")

    def bucket(self, rows: int) -> int | None:
        """The bucket a step of ``rows`` rows replays, or None (run eagerly: more rows than any bucket)."""
        i = bisect.bisect_left(self.sizes, rows)
        return self.sizes[i] if i < len(self.sizes) else None

    def padding(self, rows: int) -> int:
        """Rows of padding a step of ``rows`` rows computes in its bucket (0 when it runs eagerly)."""
        b = self.bucket(rows)
        return 0 if b is None else b - rows


def can_capture(device: torch.device) -> bool:
    """Whether decode steps on ``device`` can be recorded as CUDA graphs."""
    return device.type == "cuda" and torch.cuda.is_available()


def graph_pool(device: torch.device):
    """A memory pool the graphs of one decode loop can share (they never replay at the same time, and the caller
    copies each replay's output out before the next), or None where there are no graphs."""
    return torch.cuda.graph_pool_handle() if can_capture(device) else None


def capture(step: Callable[[], torch.Tensor], device: torch.device, warmup: int = 2, pool=None):
    """Record ``step`` (reading and writing only tensors allocated before the call: its static inputs and
    buffers) as a CUDA graph; returns ``replay() -> output`` or None when capture is impossible here (not a CUDA
    device, or the step does something a graph cannot hold: a host sync, a new allocation shape, a collective
    the backend cannot capture), in which case the caller runs ``step`` eagerly. ``pool``: from ``graph_pool``,
    to share one memory pool among a loop's graphs (None: a private pool each)."""
    if not can_capture(device):
        return None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # kernels pick their algorithms and workspaces outside the graph
                step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
    except RuntimeError:
        return None

    def replay():
        graph.replay()
        return out

    return replay
