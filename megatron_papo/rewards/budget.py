"""Rewards under a per-response time budget: a small pool of worker processes that can be killed.

Graders run untrusted model output through sympy, whose big-integer and simplification paths can run for hours
on a short string (``3^{0x7FFFFFF}`` against ``0.5``); the static guards of ``math_rewards`` cover the known forms,
this covers the class. Each response is graded in a worker process; a response that takes longer than
``timeout_s`` scores 0 (``{"overall": 0, "accuracy": 0, "format": 0}``), is counted as timed out, and its worker is
killed and replaced. A pure-Python time limit could not do this: a single C-level big-integer operation never
returns to the interpreter.

Workers start when first needed and leave the trainer's signals to it and die with it (``platform.children``). They
are forked while no accelerator runtime has started in the trainer, and spawned (a fresh interpreter) once CUDA has
(``platform.children.safe_start_method``): forking a process whose CUDA/NCCL threads hold locks can hang the child.
Either way each job carries its reward function, pickled by reference (module and name), so rewards registered or
replaced in this process are the ones used; a spawned worker imports the function's module. A reward that cannot
be sent (a lambda, a closure) or that the worker cannot import (defined in ``python -c`` or an interactive
session) is graded in the trainer without a time budget, with one warning naming it. ``timeout_s=0`` grades
inline, unguarded.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import pickle
import time
from multiprocessing.connection import wait
from typing import Callable, Optional, Sequence

ZERO = {"overall": 0.0, "accuracy": 0.0, "format": 0.0}
UNLOADABLE = "unloadable"             # a worker's answer to a job it could not unpickle (its reward's module)
_NOT_SENDABLE = (AttributeError, TypeError, ValueError, pickle.PicklingError, mp.ProcessError)
log = logging.getLogger(__name__)


def _serve(conn) -> None:
    from megatron_papo.platform.children import ignore_trainer_signals

    ignore_trainer_signals()
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        except Exception as exc:  # noqa: BLE001 - the reward's module cannot be imported here: the trainer grades it
            conn.send((UNLOADABLE, f"{type(exc).__name__}: {exc}"))
            continue
        if job is None:
            return
        fn, response, answer = job
        try:
            conn.send(dict(fn(response, answer)))
        except Exception:  # noqa: BLE001 - a reward that raises scores 0, like one that never returns
            conn.send(dict(ZERO))


class _Worker:
    def __init__(self, start_method: str):
        ctx = mp.get_context(start_method)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        # the budget times grading, not process start-up: wait until the worker is serving
        if not self.conn.poll(120) or self.conn.recv() != "ready":
            raise RuntimeError("reward worker did not start within 120 s")
        self.job: Optional[int] = None
        self.started = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardPool:
    """``score(jobs)`` grades ``(reward_fn, response, ground_truth)`` triples within ``timeout_s`` each."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError("reward pool: need num_workers >= 1 and timeout_s > 0")
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self._workers: list[_Worker] = []
        self.timed_out = 0
        self.start_methods: set[str] = set()          # how its workers were started (fork / spawn)
        self._warned: set[str] = set()

    def _new_worker(self) -> _Worker:
        from megatron_papo.platform.children import safe_start_method

        method = safe_start_method()
        self.start_methods.add(method)
        return _Worker(method)

    def _ensure(self) -> None:
        self._workers = [w for w in self._workers if w.proc.is_alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(self._new_worker())

    def score(self, jobs: Sequence[tuple[Callable, str, str]]) -> tuple[list[dict], int]:
        """Scores in job order and how many of them timed out (scored 0)."""
        self._ensure()
        results: list[Optional[dict]] = [None] * len(jobs)
        pending, timed_out = list(range(len(jobs)))[::-1], 0
        while pending or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if w.job is None and pending:
                    w.job, w.started = pending.pop(), time.monotonic()
                    try:
                        w.conn.send(jobs[w.job])
                    except _NOT_SENDABLE as exc:                           # not picklable: inline
                        results[w.job], w.job = self._inline(jobs[w.job], f"{type(exc).__name__}: {exc}"), None
            busy = [w for w in self._workers if w.job is not None]
            if not busy:
                continue
            deadline = min(w.started for w in busy) + self.timeout_s
            for conn in wait([w.conn for w in busy], timeout=max(0.0, deadline - time.monotonic())):
                w = next(x for x in busy if x.conn is conn)
                got = self._receive(w)
                if isinstance(got, tuple) and got[0] == UNLOADABLE:
                    got = self._inline(jobs[w.job], got[1])
                results[w.job], w.job = got, None
            timed_out += self._reap(busy, results)
        self.timed_out += timed_out
        return [r if r is not None else dict(ZERO) for r in results], timed_out

    def _inline(self, job: tuple, why: str) -> dict:
        """Grade ``job`` here, without a time budget (its reward cannot reach a worker); warn once per reward."""
        fn, response, answer = job
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        if name not in self._warned:
            self._warned.add(name)
            log.warning(f"reward {name} cannot run in a reward worker ({why[:200]}); it is graded in the trainer "
                        "without a time budget: define it at module level in an importable module")
        return dict(fn(response, answer))

    def _receive(self, w: _Worker):
        try:
            return w.conn.recv()
        except (EOFError, OSError):                       # the worker died (e.g. out of memory): score 0
            return dict(ZERO)

    def _reap(self, busy: list, results: list) -> int:
        """Kill and replace workers whose job ran past the budget; their responses score 0."""
        now, count = time.monotonic(), 0
        for w in busy:
            if w.job is not None and now - w.started >= self.timeout_s:
                results[w.job] = dict(ZERO)
                w.kill()
                self._workers[self._workers.index(w)] = self._new_worker()
                count += 1
        return count

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
        self._workers = []


_pools: dict = {}
_totals = {"timed_out": 0}


@atexit.register
def _close_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def timed_out_total() -> int:
    """Responses that ran out of their time budget in this process so far."""
    return _totals["timed_out"]


def score_responses(jobs: Sequence[tuple[Callable, str, str]], timeout_s: float, num_workers: int = 2):
    """``(scores, timed_out)`` for the jobs, through a process-wide pool of that size (``timeout_s`` 0: inline)."""
    if timeout_s <= 0:
        return [dict(fn(r, a)) for fn, r, a in jobs], 0
    key = (num_workers, float(timeout_s))
    if key not in _pools:
        _pools[key] = RewardPool(num_workers, timeout_s)
    scores, timed_out = _pools[key].score(jobs)
    _totals["timed_out"] += timed_out
    return scores, timed_out
