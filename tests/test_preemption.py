"""Signals and helper processes, end to end through ``megatron-papo train`` on the tiny config.

One uninterrupted reference run; runs interrupted by SIGTERM to the whole process group (what SLURM does, with
DataLoader workers) and by Ctrl-C (SIGINT) during the supervised warm-start must exit with EXIT_PREEMPTED after
saving, and their resumed runs must print exactly the reference's step lines (nothing lost, nothing repeated).
``rl_steps=0`` after a warm-start saves. kill -9 of the trainer leaves no helper process alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WARMUP, STEPS = 20, 6
SETS = ["data.synthetic_samples=48", "data.shuffle_buffer=16", "data.num_workers=2", "rollout.n=4",
        "rollout.max_new_tokens=6", "training.prompts_per_step=2", "training.prompts_per_update=2",
        "training.micro_batch_size=4", f"training.warmup_sft_steps={WARMUP}", f"training.rl_steps={STEPS}",
        "checkpoint.save_interval=0", "logging.tensorboard_dir=null", "logging.progress=false"]


def _cmd(root: Path, ckpt: str, *extra: str) -> list[str]:
    sets = [f"data.train_shards={root / 'data'}", f"checkpoint.dir={root / ckpt}", *SETS, *extra]
    return [sys.executable, "-m", "megatron_papo.cli", "train", *[a for s in sets for a in ("--set", s)]]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _run(cmd: list[str], trigger: str | None = None, sig: int = signal.SIGTERM, on_trigger=None):
    """Run the trainer in its own process group; at the first line containing ``trigger`` send ``sig`` to the
    whole group (or call ``on_trigger(proc)``). Returns (exit code, output lines)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            cwd=ROOT, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if trigger is not None and trigger in line:
                trigger = None
                (on_trigger or (lambda p: os.killpg(p.pid, sig)))(proc)
        return proc.wait(timeout=120), lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _steps(lines: list[str]) -> dict:
    """RL step lines without the timing column, by step number."""
    out = {}
    for line in lines:
        if line.startswith("step ") and "|" in line:
            out[int(line.split()[1].split("/")[0])] = line.rsplit("| s/step", 1)[0]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    rc, lines = _run(_cmd(root, "ref"))
    assert rc == 0, "\n".join(lines[-30:])
    steps = _steps(lines)
    assert sorted(steps) == list(range(1, STEPS + 1))
    return root, steps


def test_sigterm_to_the_process_group_saves_and_resumes_exactly(reference):
    from megatron_papo.training.preemption import EXIT_PREEMPTED

    root, ref = reference
    rc, lines = _run(_cmd(root, "a"), trigger="step 2/")
    assert rc == EXIT_PREEMPTED, "\n".join(lines[-30:])
    assert any("SIGTERM received: saved" in x for x in lines)
    done = _steps(lines)
    assert max(done) < STEPS                                  # really interrupted
    rc, lines = _run(_cmd(root, "a", "checkpoint.resume=auto"))
    assert rc == 0, "\n".join(lines[-30:])
    resumed = _steps(lines)
    assert min(resumed) == max(done) + 1                       # the step in flight was redone, nothing skipped
    assert {**done, **resumed} == ref


def test_ctrl_c_during_warm_start_saves_progress_and_rl_steps_zero_saves(reference):
    from megatron_papo.training.preemption import EXIT_PREEMPTED

    root, ref = reference
    rc, lines = _run(_cmd(root, "b"), trigger="warm-start:", sig=signal.SIGINT)
    assert rc == EXIT_PREEMPTED, "\n".join(lines[-30:])
    assert (root / "b" / "step_0").is_dir() and not _steps(lines)
    done = _warmup_done(root / "b" / "step_0")
    assert 0 < done < WARMUP
    rc, lines = _run(_cmd(root, "b", "checkpoint.resume=auto", "training.rl_steps=0"))
    assert rc == 0, "\n".join(lines[-30:])
    assert any(f"resuming after {done}" in x for x in lines)
    assert _warmup_done(root / "b" / "step_0") == WARMUP       # rl_steps=0 still saves the warm-start
    rc, lines = _run(_cmd(root, "b", "checkpoint.resume=auto"))
    assert rc == 0 and _steps(lines) == ref, "\n".join(lines[-30:])


def _warmup_done(path: Path) -> int:
    common = torch.load(path / "common.pt", weights_only=False)
    return int(common["progress"]["warmup_sft_done"])


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _gone(procs, timeout: float = 20.0) -> list:
    import psutil

    end = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < end:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return alive


def test_kill_9_leaves_no_helper_process(tmp_path):
    seen = []

    def kill(proc):
        seen.extend(_descendants(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)

    rc, lines = _run(_cmd(tmp_path, "c", "checkpoint.save_interval=1"), trigger="step 2/", on_trigger=kill)
    assert rc == -signal.SIGKILL
    assert seen, "the run was expected to have DataLoader workers"
    assert _gone(seen) == []


def test_handler_records_signals_during_a_save_and_a_second_ctrl_c_quits():
    from megatron_papo.training.preemption import PreemptionHandler

    with PreemptionHandler() as h:
        with h.saving():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)               # recorded, the save goes on
            os.kill(os.getpid(), signal.SIGTERM)
        assert h.should_stop() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


def _fork_and_die(conn_path: str) -> None:
    from megatron_papo.platform.children import child_hygiene

    with child_hygiene():
        pid = os.fork()
        if pid == 0:
            while True:
                time.sleep(0.1)
        Path(conn_path).write_text(str(pid))
        time.sleep(60)


def test_forked_helpers_ignore_signals_and_die_with_their_parent(tmp_path):
    import psutil

    out = tmp_path / "pid"
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from test_preemption import _fork_and_die; "
            f"_fork_and_die({str(out)!r})")
    parent = subprocess.Popen([sys.executable, "-c", code], env=_env())
    try:
        end = time.monotonic() + 60
        while not out.exists() or not out.read_text():
            assert time.monotonic() < end and parent.poll() is None
            time.sleep(0.1)
        child = psutil.Process(int(out.read_text()))
        child.send_signal(signal.SIGTERM)                      # left to the trainer: the helper keeps running
        time.sleep(0.5)
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        parent.kill()
        parent.wait()
        assert _gone([child]) == []
    finally:
        if parent.poll() is None:
            parent.kill()
