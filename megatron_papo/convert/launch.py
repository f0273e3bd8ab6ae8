"""Run a conversion step on N local gloo processes (one per TP x PP rank), collecting per-rank results.

The tools convert on CPU: each spawned rank builds its part of the model, so no rank ever holds more than its
shard of the megatron model (plus one HF tensor at a time).
"""

from __future__ import annotations

import os
import queue
import time
import traceback

import torch.multiprocessing as mp


def _worker(rank, world, port, tp, pp, fn, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        from megatron_papo.platform import init_distributed, init_model_parallel, shutdown

        init_distributed()
        init_model_parallel(tp=tp, pp=pp)
        results.put((rank, True, fn(*args)))
        shutdown()
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, tp: int = 1, pp: int = 1, args: tuple = (), timeout_s: float = 3600.0) -> list:
    """``fn(*args)`` on tp*pp spawned ranks with megatron parallel state set up; returns rank-ordered results."""
    from megatron_papo.platform.distributed import _free_port

    world = tp * pp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, tp, pp, fn, args, results), daemon=False)
             for r in range(world)]  # not daemonic: the checkpoint writer starts its own helper process
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead and results.empty():
                    raise RuntimeError(f"conversion rank(s) {dead} died without reporting")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"conversion ranks did not finish within {timeout_s:.0f}s")
                continue
            if not ok:
                raise RuntimeError(f"conversion rank {rank} failed:\n{payload}")
            out[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]
