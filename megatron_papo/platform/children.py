"""Helper processes die with their parent and leave signals to it; how to start one safely.

The trainer forks helpers: DataLoader workers and megatron's checkpoint writers. SLURM (and a terminal's Ctrl-C)
signals the whole process group, so a helper that died of SIGTERM would break the very save the trainer is about to
make; and a trainer killed with SIGKILL must not leave helpers behind (a forked writer holding sockets makes a peer
rank wait out the collective timeout). While :func:`child_hygiene` is active every forked child therefore ignores
SIGINT/SIGTERM/SIGUSR1 (the trainer handles them) and asks the kernel for SIGKILL when its parent dies (Linux
``prctl(PR_SET_PDEATHSIG)``; elsewhere a no-op). megatron's checkpoint writer also starts a multiprocessing manager
(a separate ~300 MB server process that outlives a killed trainer) only to pass results back; saves here are
synchronous, so an in-process queue does that job.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import signal
import sys
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_state = {"active": False, "registered": False}


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def ignore_trainer_signals() -> None:
    """In a helper process: leave the trainer's signals to the trainer, and die with it."""
    for s in _HANDLED:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent()


def safe_start_method() -> str:
    """How to start a helper process now: ``fork`` while no accelerator runtime has started in this process (cheap,
    and the child sees everything set up here), ``spawn`` once CUDA has: the CUDA runtime keeps threads and locks,
    and a forked child inherits them in whatever state they were in (it can hang on a lock another thread held).
    Decided per start, so a pool that began before CUDA started switches to spawn for its later workers."""
    torch = sys.modules.get("torch")                 # never imported: no CUDA runtime either
    return "spawn" if torch is not None and torch.cuda.is_initialized() else "fork"


def _after_fork_in_child() -> None:
    if _state["active"]:
        ignore_trainer_signals()


def _keep_writer_queue_in_process() -> None:
    """megatron-core 0.16.1 caches one ``Manager().Queue()`` for its writer results (``_results_queue``)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", "absent") is None:
        fa._results_queue = queue.Queue()


@contextmanager
def child_hygiene():
    """Forked children ignore the trainer's signals and die with it, for the duration of the block."""
    if not _state["registered"]:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _state["registered"] = True
    _keep_writer_queue_in_process()
    previous, _state["active"] = _state["active"], True
    try:
        yield
    finally:
        _state["active"] = previous
