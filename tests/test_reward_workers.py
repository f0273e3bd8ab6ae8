"""How reward workers start: forked while no CUDA runtime has started in the trainer, spawned once it has (forking a
process with CUDA/NCCL threads can hang the child), and either way a reward registered in this process is the one
the worker runs. CUDA cannot start on a CPU machine, so its start is simulated by patching
``torch.cuda.is_initialized`` (the one thing ``platform.children.safe_start_method`` reads)."""

from __future__ import annotations

import logging
import os
import sys
import time
import types

import torch

from megatron_papo.platform.children import safe_start_method
from megatron_papo.rewards import get_reward, register_reward
from megatron_papo.rewards.budget import RewardPool

MARK = "import-time"          # the test changes it in this process: a forked worker sees the change, a spawned not


@register_reward("test_worker_reward")
def _worker_reward(response: str, answer: str) -> dict:
    if response == "hang":
        while True:
            time.sleep(0.05)
    return {"overall": float(response == answer), "accuracy": float(response == answer), "format": 1.0,
            "pid": os.getpid(), "mark": MARK}


def test_fork_without_cuda_spawn_once_cuda_started(monkeypatch):
    assert safe_start_method() == "fork"                      # CPU build: CUDA never starts
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert safe_start_method() == "spawn"


def _dynamic_reward():
    """A reward whose module exists in this process only (as from ``python -c``): a spawned worker cannot import it."""
    mod = types.ModuleType("s4_rewards_made_at_runtime")
    exec("def reward(response, answer):\n    return {'overall': 0.5, 'accuracy': 0.0, 'format': 1.0}", mod.__dict__)
    sys.modules[mod.__name__] = mod
    mod.reward.__module__ = mod.__name__
    return mod.reward


def test_spawned_workers_run_the_registered_reward_and_keep_the_budget(monkeypatch, caplog):
    monkeypatch.setattr(sys.modules[__name__], "MARK", "changed-in-trainer")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    fn = get_reward("test_worker_reward")
    pool = RewardPool(num_workers=1, timeout_s=1.5)
    try:
        with caplog.at_level(logging.WARNING, logger="megatron_papo.rewards.budget"):
            scores, timed_out = pool.score([(fn, "4", "4"), (fn, "hang", "4"), (fn, "5", "4"),
                                            (lambda r, a: {"overall": 0.25, "accuracy": 0.0, "format": 0.0}, "x", "y"),
                                            (_dynamic_reward(), "x", "y")])
        assert pool.start_methods == {"spawn"}
        assert timed_out == 1 and scores[1]["overall"] == 0.0
        assert [scores[i]["overall"] for i in (0, 2, 3, 4)] == [1.0, 0.0, 0.25, 0.5]
        assert scores[0]["pid"] != os.getpid() and scores[0]["mark"] == "import-time"   # a fresh interpreter ran it
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert "<lambda>" in warned and "s4_rewards_made_at_runtime.reward" in warned
        assert "without a time budget" in warned
        scores, timed_out = pool.score([(fn, "6", "6")])                 # the spawned replacement keeps serving
        assert timed_out == 0 and scores[0]["overall"] == 1.0
    finally:
        pool.close()
