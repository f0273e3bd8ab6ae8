"""The multi-rank harness itself: results come back, failures and unpicklable results fail fast, hangs time out."""

import pytest
import torch

from multirank import run_multirank


def _values(rank, world):
    return torch.full((3,), float(rank), requires_grad=True) * 2  # non-leaf tensors come back as plain data


def _unpicklable(rank, world):
    return lambda: rank


def _raises(rank, world):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    return rank


def _hangs(rank, world):
    if rank == 0:
        torch.distributed.barrier()  # rank 1 never joins
    return rank


def test_results_and_failures():
    out = run_multirank(_values, 2, timeout=60)
    assert [o.tolist() for o in out] == [[0.0] * 3, [2.0] * 3]
    with pytest.raises(AssertionError, match="(?i)pickle"):
        run_multirank(_unpicklable, 2, timeout=60)
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_multirank(_raises, 2, timeout=60)


def test_hung_collective_times_out():
    with pytest.raises((TimeoutError, RuntimeError, AssertionError)):
        run_multirank(_hangs, 2, timeout=15)
