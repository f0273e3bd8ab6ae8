"""``megatron-papo experiment``: a tiny 2-arm x 2-seed experiment through the real train / evaluate commands.

Checked: every arm of a seed starts from that seed's warm-start (policy and reference hold its weights), a rerun
launches nothing, an interrupted run resumes from its newest checkpoint and ends where the uninterrupted one did,
and the summary's statistics equal a hand computation from the runs' evaluation files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

TINY = ["rollout.n=4", "rollout.max_new_tokens=6", "training.prompts_per_step=2", "training.prompts_per_update=1",
        "training.micro_batch_size=8", "training.rl_steps=2", "data.shuffle_buffer=0", "checkpoint.save_interval=1",
        "checkpoint.keep_last=0", "training.cpu_threads=1"]


def _spec_file(tmp: Path) -> Path:
    spec = {"out_dir": str(tmp / "exp"), "seeds": [1, 2], "set": TINY, "warm_start_steps": 3, "train_samples": 16,
            "heldout_samples": 4, "eval_k": 2, "eval_max_new_tokens": 6, "bootstrap_resamples": 2000,
            "baseline": "grpo", "control": "papo_g",
            "arms": [{"name": "grpo", "set": ["algorithm.preset=grpo"]},
                     {"name": "papo_g", "set": ["algorithm.preset=papo_g", "algorithm.gamma=0.1"]}]}
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Counting:
    def __init__(self, launch=None):
        from megatron_papo.evaluation.experiment import subprocess_launcher

        self.calls, self._launch = [], launch or subprocess_launcher

    def __call__(self, args, log_file):
        self.calls.append(args[0])
        return self._launch(args, log_file)


def _cli_child(args: list, log_file: str) -> None:
    """``megatron-papo ARGS`` in a forked child, its output appended to ``log_file`` (as subprocess_launcher)."""
    import os
    import sys

    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from megatron_papo.cli import main

    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def preloaded_launcher(args: list, log_file: Path) -> int:
    """The experiment's commands in processes forked from a fresh server that imported the trainer once (a
    forkserver, never a process that computed anything), instead of a new interpreter per command: the same
    ``cli.main`` runs, minus ~5 CPU s of imports each. The rerun below still goes through subprocess_launcher."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["megatron_papo.cli", "megatron_papo.training.trainer", "megatron_papo.rollout",
                                "megatron_papo.evaluation.command", "megatron_papo.evaluation.run"])
    proc = ctx.Process(target=_cli_child, args=(list(args), str(log_file)))
    proc.start()
    proc.join()
    return proc.exitcode


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    from megatron_papo.evaluation.experiment import load_spec, run_experiment

    tmp = tmp_path_factory.mktemp("exp")
    spec = load_spec(str(_spec_file(tmp)))
    launch = Counting(preloaded_launcher)
    summary = run_experiment(spec, launch=launch, log=lambda m: None)
    return spec, summary, launch.calls


def test_every_unit_ran_once_and_outputs_exist(experiment):
    spec, summary, calls = experiment
    assert calls == ["train", "evaluate", "train", "evaluate", "train", "evaluate"] * 2   # warm + 2 arms, 2 seeds
    out = Path(spec.out_dir)
    for name in ("summary.json", "summary.md", "summary.png"):
        assert (out / name).is_file()
    md = (out / "summary.md").read_text()
    assert "| papo_g - grpo | accuracy |" in md


def _compare_reference(rank, world, warm_dir, arm_dir):
    import torch
    from megatron.core.dist_checkpointing import load_plain_tensors

    warm, arm = load_plain_tensors(warm_dir), load_plain_tensors(arm_dir)
    ref = {k[len("reference."):]: v for k, v in arm.items() if k.startswith("reference.")}
    return (len(ref), sum(k in warm for k in ref), all(torch.equal(ref[k], warm[k]) for k in ref if k in warm),
            all(torch.equal(arm[k], warm[k]) for k in ref if k in warm))


def test_arms_start_from_the_seed_warm_start(experiment):
    """The reference model saved by an arm is the warm-start's policy, tensor for tensor; the policy moved on."""
    from multirank import run_multirank

    from megatron_papo.evaluation.experiment import run_dir, warm_dir

    spec, _, _ = experiment
    (n, shared, ref_equal, policy_equal), = run_multirank(_compare_reference, 1, args=(
        str(warm_dir(spec, 2) / "checkpoints" / "step_0"), str(run_dir(spec, "papo_g", 2) / "checkpoints" / "step_1")))
    assert n > 0 and shared == n and ref_equal and not policy_equal
    cfg = yaml.safe_load((run_dir(spec, "papo_g", 2) / "config.yaml").read_text())
    assert cfg["training"]["warmup_sft_steps"] == 0 and cfg["training"]["seed"] == 2


def test_summary_matches_hand_computation(experiment):
    spec, summary, _ = experiment
    from megatron_papo.evaluation.experiment import run_dir

    def overall(arm, key):
        return [json.loads((run_dir(spec, arm, s) / "eval.json").read_text())["datasets"]["overall"][key]
                for s in (1, 2)]

    acc = {arm: overall(arm, "avg@k") for arm in ("grpo", "papo_g")}
    for arm in acc:
        for metric, key in (("accuracy", "avg@k"), ("perception_kl", "kl_exact")):   # the KL is never exactly 0
            v, s = overall(arm, key), summary["per_arm"][arm][metric]
            assert s["mean"] == pytest.approx((v[0] + v[1]) / 2)
            assert s["std"] == pytest.approx(abs(v[0] - v[1]) / 2 ** 0.5)
    d = [b - a for a, b in zip(acc["grpo"], acc["papo_g"])]
    pair = summary["pairs"][0]["accuracy"]
    assert pair["mean"] == pytest.approx(sum(d) / 2)
    # two seeds: resampled means are d1, (d1+d2)/2, d2 with probabilities 1/4, 1/2, 1/4 -> the 95% interval is
    # [min d, max d]
    assert pair["ci95"] == pytest.approx([min(d), max(d)])
    assert summary["control_drift"]["accuracy"] == pytest.approx(np.mean(np.abs(d)))


def test_rerun_skips_and_interrupted_run_resumes(experiment):
    from megatron_papo.evaluation.experiment import load_spec, run_dir, run_experiment

    spec, summary, _ = experiment
    spec = load_spec(str(Path(spec.out_dir).parent / "exp.yaml"))
    launch = Counting()
    assert run_experiment(spec, launch=launch, log=lambda m: None)["per_arm"] == summary["per_arm"]
    assert launch.calls == []

    rd = run_dir(spec, "papo_g", 2)                   # as if killed after step 1: no final checkpoint, no eval
    before = json.loads((rd / "eval.json").read_text())["records"]
    (rd / "eval.json").unlink()
    shutil.rmtree(rd / "checkpoints" / "step_2")
    launch = Counting()
    again = run_experiment(spec, launch=launch, log=lambda m: None)
    assert launch.calls == ["train", "evaluate"]
    assert "resumed from" in (rd / "train.log").read_text()
    assert json.loads((rd / "eval.json").read_text())["records"] == before   # resumed == uninterrupted
    assert again["per_arm"] == summary["per_arm"]


def test_bad_spec_is_one_line(tmp_path):
    from megatron_papo.config import ConfigError
    from megatron_papo.evaluation.experiment import load_spec

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"out_dir": "x", "seeds": [1], "arms": [{"name": "a"}], "control": "b"}))
    with pytest.raises(ConfigError, match="control 'b' is not an arm"):
        load_spec(str(path))
    path.write_text(yaml.safe_dump({"out_dir": "x", "seeds": [1], "arms": [{"name": "a", "set": ["training.nope=1"]}]}))
    with pytest.raises(ConfigError, match="nope"):
        load_spec(str(path))


def test_summary_statistics_by_hand():
    """3 arms x 3 seeds of made-up evaluation results, every statistic worked out by hand."""
    from megatron_papo.evaluation.experiment import Arm, ExperimentSpec
    from megatron_papo.evaluation.experiment_summary import format_markdown, summarize_runs

    acc = {"grpo": [0.5, 0.6, 0.7], "papo_g": [0.55, 0.6, 0.8], "control": [0.52, 0.58, 0.71]}
    final_reliance = [0.2, 0.29, 0.4]                            # warm-start reliance 0.3 for every seed

    def run(arm, i):
        m = {"accuracy": acc[arm][i], "accuracy_blank": 0.25, "reliance_blank": final_reliance[i],
             "reliance_masked": 0.1, "perception_kl": 0.01 * (i + 1)}
        warm = {"accuracy": 0.5, "accuracy_blank": 0.2, "reliance_blank": 0.3}
        return {"final": m, "warm": warm, "curves": {"reward/mean": [0.1, 0.2], "actor/pg_clipfrac": [0.01, 0.03]}}

    spec = ExperimentSpec(out_dir="unused", arms=[Arm(a) for a in acc], seeds=[1, 2, 3], control="control",
                          baseline="grpo")
    s = summarize_runs(spec, {a: {seed: run(a, i) for i, seed in enumerate(spec.seeds)} for a in acc})
    g = s["per_arm"]["grpo"]
    assert g["accuracy"]["mean"] == pytest.approx(0.6) and g["accuracy"]["std"] == pytest.approx(0.1)
    assert g["accuracy"]["ci95"] == pytest.approx([0.6 - 4.302653 * 0.1 / 3 ** 0.5, 0.6 + 4.302653 * 0.1 / 3 ** 0.5])
    assert g["forgetting_runs"] == 1 and g["clip_fraction"] == pytest.approx(0.02)   # reliance 0.3 -> 0.2 forgot
    pair = next(p for p in s["pairs"] if (p["a"], p["b"]) == ("grpo", "papo_g"))["accuracy"]
    assert pair["diffs"] == pytest.approx([0.05, 0.0, 0.1]) and pair["mean"] == pytest.approx(0.05)
    assert pair["b_better"] == 2
    # resampled means of {0.05, 0, 0.1}: P(all three 0) = P(all three 0.1) = 1/27 > 2.5%
    assert pair["ci95"] == pytest.approx([0.0, 0.1])
    assert pair["detectable_80"] == pytest.approx((4.302653 + 1.060660) * 0.05 / 3 ** 0.5, rel=1e-5)
    assert s["control_drift"]["accuracy"] == pytest.approx((0.02 + 0.02 + 0.01) / 3)
    assert pair["beyond_drift"] is False                      # its interval reaches 0
    assert "| papo_g - grpo | accuracy | +0.0500 | [+0.0000, +0.1000] | 2/3 |" in format_markdown(s)


def test_shipped_cpu_experiment_config_loads():
    """The example experiment (not run in CI) resolves: every arm's training config validates."""
    from megatron_papo.evaluation.experiment import load_spec, run_config

    root = Path(__file__).resolve().parents[1]
    spec = load_spec(str(root / "examples" / "experiments" / "papo_vs_grpo_cpu.yaml"))
    assert spec.arm_names == ["grpo", "papo_g", "control", "vppo", "dapo", "vppo_grpo", "papo_d"]
    assert (spec.baseline, spec.control) == ("grpo", "control")
    algo = {arm.name: run_config(spec, arm, 1)["algorithm"] for arm in spec.arms}   # validated by load_config
    assert algo["vppo_grpo"]["consumers"] == ["vppo"] and algo["vppo_grpo"]["beta"] == algo["grpo"]["beta"] > 0
    assert algo["dapo"]["consumers"] is None and algo["dapo"]["dynamic_sampling"] is True


def test_curves_read_every_tensorboard_run_directory(tmp_path):
    """The trainer logs each start of a run into its own run-<time> directory: the summary reads them all, a
    resumed start's repeated steps replacing the earlier start's (the clip fraction used to read as n/a)."""
    from torch.utils.tensorboard import SummaryWriter

    from megatron_papo.evaluation.experiment_summary import read_curves

    for name, steps in (("run-20261130-100000", {1: 0.1, 2: 0.2, 3: 0.3}), ("run-20261130-110000", {3: 0.33, 4: 0.4})):
        with SummaryWriter(str(tmp_path / "tb" / name)) as w:
            for step, value in steps.items():
                w.add_scalar("actor/pg_clipfrac", value, step)
                w.add_scalar("not/a_curve", value, step)
    curves = read_curves(tmp_path / "tb")
    assert list(curves) == ["actor/pg_clipfrac"]
    assert curves["actor/pg_clipfrac"] == pytest.approx([0.1, 0.2, 0.33, 0.4])
    assert read_curves(tmp_path / "missing") == {}
