"""Run a test function on N spawned gloo ranks, with tracebacks propagated and a hard timeout.

Usage (the function must live at module level so spawned processes can import it)::

    def _body(rank, world_size, x):
        ...                      # torch.distributed is initialised (gloo); return anything picklable
    results = run_multirank(_body, world_size=2, args=(x,), tp=2)   # list, one entry per rank

With ``tp``/``pp`` given, megatron's model-parallel state is initialised too (and the CPU adaptation applied).
A rank that raises fails the test with its traceback; a hung collective fails it after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, tp, pp, seed, results):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    try:
        from megatron_papo.platform import init_distributed, init_model_parallel, shutdown

        init_distributed(timeout_s=120)
        if tp is not None or pp is not None:
            init_model_parallel(tp=tp or 1, pp=pp or 1, seed=seed)
        out = fn(rank, world_size, *args)
        # Plain pickling (not torch's shared-memory reduction): the rank may exit before the parent reads its
        # result, and an unpicklable result must fail here, with a traceback, instead of hanging the queue.
        results.put((rank, "ok", pickle.dumps(out)))
        shutdown()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_multirank(fn, world_size: int, args: tuple = (), tp: int | None = None, pp: int | None = None,
                  seed: int = 1234, timeout: float = 240.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the per-rank results."""
    assert 1 <= world_size <= 8, "keep multi-rank tests small"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, tp, pp, seed, results), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    collected: dict[int, object] = {}
    errors: list[str] = []
    try:
        while len(collected) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"multi-rank test timed out after {timeout:.0f}s; ranks done: {sorted(collected)} "
                    "(a hung collective?)"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        raise RuntimeError(f"rank(s) {dead} died without reporting (exit codes "
                                           f"{[procs[i].exitcode for i in dead]})")
                continue
            if status == "ok":
                collected[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
        if errors:
            raise AssertionError("a rank failed:\n" + "\n".join(errors))
        return [collected[r] for r in range(world_size)]
    finally:
        # Results are in (or the test failed): give ranks a moment to exit cleanly, then stop them; rank 0 can
        # otherwise sit for seconds in process-group teardown, which adds up over the suite.
        deadline = time.monotonic() + 1.0
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
