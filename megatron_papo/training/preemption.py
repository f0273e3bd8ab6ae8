"""Signals during a run: SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (SLURM before a time limit) save, then exit.

The handler is installed for the whole run, from before the first model is built to after the final save. A
signal only sets a flag; every rank asks :meth:`PreemptionHandler.check` at *safe points*, and all ranks agree
through one collective (a signal to any rank stops them all). Safe points:

- after each warm-start step (the checkpoint records how many were done; the resumed run does the rest),
- in an RL step, after the rollout and after scoring, before any weight changes: the step is abandoned, the
  reader and RNG go back to where the step started, and the checkpoint is the end of the previous step,
- at the end of each RL step.

So the grace period a run needs after the signal is at most one warm-start step, or the longer of (rollout,
scoring, PPO update) of one RL step, plus one checkpoint save; SLURM's ``--signal=B:USR1@120`` must leave that.
A signal during a save is recorded and the save finishes. A second Ctrl-C outside a save stops at once (exit 130,
nothing saved). A run stopped by a signal exits with :data:`EXIT_PREEMPTED` after its checkpoint is written.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist

from megatron_papo.platform import device

# exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL: "try again later")
EXIT_PREEMPTED = getattr(os, "EX_TEMPFAIL", 75)


class Preempted(Exception):
    """Raised at a safe point once any rank received a signal; ``signum`` names it."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal_name(signum)} received")
        self.signum = signum


def signal_name(signum: Optional[int]) -> str:
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return f"signal {signum}"


class PreemptionHandler:
    """SIGINT/SIGTERM/SIGUSR1 set a flag; :meth:`should_stop` tells every rank at once to save and exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._saving = 0
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT and not self._saving:
            raise KeyboardInterrupt          # a second Ctrl-C: the user wants out now
        if self.received is None:
            self.received = signum

    def install(self) -> "PreemptionHandler":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @contextmanager
    def saving(self):
        """Signals arriving inside the block are recorded; the save is never cut short."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def should_stop(self) -> int:
        """The signal number any rank received (0: none); one collective over all ranks."""
        flag = torch.tensor([float(self.received or 0)], device=device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)       # a signal to any rank stops all of them together
        return int(flag.item())

    def check(self) -> None:
        """A safe point: raise :class:`Preempted` when any rank received a signal."""
        signum = self.should_stop()
        if signum:
            raise Preempted(signum)


_current: Optional[PreemptionHandler] = None


def set_current(handler: Optional[PreemptionHandler]) -> None:
    global _current
    _current = handler


def safe_point() -> None:
    """Called by the RL step before it changes weights; a no-op outside a run that installed a handler."""
    if _current is not None:
        _current.check()
