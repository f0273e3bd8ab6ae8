"""tools/gpu_check.py: ``--help`` and the CPU dry mode (``--cpu-smoke``: every section at toy size, one table,
exit 0 with no FAIL row; the GPU-only rows are SKIP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "gpu_check.py")


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_help():
    r = _run("--help", timeout=60)
    assert r.returncode == 0 and "--cpu-smoke" in r.stdout and "Transformer Engine" in r.stdout


def test_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "table.json"
    r = _run("--cpu-smoke", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    status = {}
    for section, check, value, reference, st in rows:
        status.setdefault(section.split()[0], []).append(st)
    assert sorted(status) == ["1", "2", "3", "4", "5", "6"], rows
    assert all(st != "FAIL" for sts in status.values() for st in sts), rows
    assert status["1"].count("ok") == 8 and status["2"] == ["ok", "ok"] and status["3"][0] == "ok", rows
    assert status["6"][0] == "ok" and status["6"][-1] == "skip", rows  # fixed-shape = normal; no graphs on CPU
    assert r.stdout.strip().splitlines()[-1].endswith("0 failed, 4 skipped")
