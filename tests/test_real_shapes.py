"""Smoke test of benchmarks/real_shapes.py at a tiny shape (--small): a random tied-embedding HF checkpoint,
hf-to-mcore at TP2 x PP2 (the tied output layer on the last stage), logits against transformers, one RL
micro-step with measured memory next to the plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_real_shapes_small(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_shapes.py"), "--small", "--tokens", "128",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio=")
    ratio = float(lines[-2].split("=")[1])                   # logits max |diff| / std, both in bf16
    assert ratio < 0.1, lines
    losses = [ln.split()[-1] for ln in lines if ln[:1].isdigit() and len(ln.split()) == 7]
    assert sum(v != "-" for v in losses) == 2, lines         # the last stage's two TP ranks report the loss
