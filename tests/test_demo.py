"""The embedded demo through the real command line (shortened), then ``megatron-papo evaluate`` on its checkpoint.

The demo must end with ``mean reward <start> -> <end>`` with end > start, write tensorboard logs and a
checkpoint; evaluate must load that checkpoint, grade k answers per question per data set and write JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# fewer RL steps than the full demo (its defaults otherwise: same model, data, warm-start and batch); the final
# validation moves with the last step
SHORT = ["training.rl_steps=30", "training.eval_interval=30"]


def _cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "megatron_papo.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    sets = [a for s in SHORT + ["logging.progress=false"] for a in ("--set", s)]
    proc = _cli(["train", *sets], cwd, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd, proc.stdout


def test_demo_reward_rises_and_writes_logs_and_checkpoint(demo):
    cwd, out = demo
    lines = out.strip().splitlines()
    assert any("warm-start" in line for line in lines), "the run must announce its supervised warm-start"
    m = re.fullmatch(r"mean reward (\d+\.\d+) -> (\d+\.\d+)", lines[-1])
    assert m, lines[-1]
    reliance = re.search(r"image reliance .*: accuracy real (\d\.\d+) / masked (\d\.\d+) / black (\d\.\d+)$",
                         lines[-2])
    assert reliance, lines[-2]                         # the final policy's accuracy with real / masked / black image
    assert (cwd / "runs/demo/data/heldout").is_dir()   # held-out questions: another synthetic seed
    start, end = float(m.group(1)), float(m.group(2))
    assert end > start, (start, end)
    assert list((cwd / "runs/demo/tensorboard").glob("run-*/events.out.tfevents.*"))
    assert (cwd / "runs/demo/checkpoints/step_30/metadata.json").is_file()


def test_evaluate_the_demo_checkpoint(demo):
    cwd, _ = demo
    out_json = cwd / "eval.json"
    proc = _cli(["evaluate", "--checkpoint", "runs/demo/checkpoints", "--data", "runs/demo/data/train", "--k", "4",
                 "--limit", "24", "--max-new-tokens", "16", "--out", str(out_json)], cwd, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out_json.read_text())
    ds = res["datasets"]
    assert set(ds) == {"synthetic_color", "synthetic_count", "overall"}
    assert ds["synthetic_color"]["questions"] + ds["synthetic_count"]["questions"] == 24
    assert ds["overall"]["samples"] == 24 * 4
    assert res["skipped"] == {"count": 0, "by_reason": {}, "samples": []}
    weighted = sum(ds[d]["avg@k"] * ds[d]["questions"] for d in ("synthetic_color", "synthetic_count")) / 24
    assert abs(ds["overall"]["avg@k"] - weighted) < 1e-9
    assert 0.0 < ds["overall"]["avg@k"] <= 1.0        # the trained policy answers some questions right
    assert "avg@4" in proc.stdout


def test_generate_from_the_demo_checkpoint(demo, tmp_path):
    """`megatron-papo generate` reads training checkpoints too (the model and tokenizer come from its config)."""
    from PIL import Image

    cwd, _ = demo
    image = tmp_path / "shapes.png"
    Image.new("RGB", (56, 56), (255, 255, 255)).save(image)
    proc = _cli(["generate", "--checkpoint", "runs/demo/checkpoints/step_30", "--prompt", "How many shapes are "
                 "there?", "--image", str(image), "--greedy", "--max-new-tokens", "12"], cwd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip(), "a response is printed"
    assert re.search(r"\[\d+ tokens, finished by (eos|length|stop)\]", proc.stderr)
