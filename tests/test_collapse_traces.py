"""The collapse detector on metric traces of real CPU runs (tests/data/collapse_traces.json: two collapses produced
with a large gamma / learning rate, two healthy GRPO runs; see the file's descriptions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_papo.algorithms import CollapseDetector

TRACES = json.loads((Path(__file__).parent / "data" / "collapse_traces.json").read_text())["runs"]


def _warnings(run: dict, keys=None) -> list[tuple[int, str]]:
    det = CollapseDetector()
    keys = keys or [k for k in run if k not in ("reward", "description")]
    out = []
    for i in range(len(run["reward"])):
        msg = det.update({k: run[k][i] for k in keys}, step=i + 1)
        if msg:
            out.append((i + 1, msg))
    return out


def test_collapse_is_flagged_early_and_once_per_episode():
    run = TRACES["B"]
    zero = next(i + 1 for i, r in enumerate(run["reward"]) if r == 0.0)        # reward gone for good: step 31
    warned = _warnings(run)
    first = warned[0][0]
    assert "reference KL" in warned[0][1]
    assert first <= 8 and zero - first >= 20, (first, zero)                    # ref KL > 1 nat from step 6
    assert len(warned) <= 3, warned                                            # not a warning per step


def test_reference_kl_rule_needs_no_perception_term_nor_clip_fraction():
    run = TRACES["B"]
    with_all = _warnings(run)[0][0]
    assert _warnings(run, keys=["ref_kl", "nll"])[0][0] == with_all            # as GRPO would log it
    assert _warnings(TRACES["A"])[0][0] == 1                                   # the fast collapse: at once


@pytest.mark.parametrize("name", ["C", "D"])
def test_healthy_runs_are_quiet(name):
    assert _warnings(TRACES[name]) == []


def test_joint_rule_ignores_a_clip_fraction_that_cannot_move():
    det = CollapseDetector(window=3)
    msgs = [det.update({"perception_kl": 0.03 * 1.5 ** s, "pg_clipfrac": 0.0, "nll": 0.4 * 1.1 ** s,
                        "mask_nll": 0.6 * 1.1 ** s}, step=s) for s in range(10)]
    fired = [m for m in msgs if m]
    assert "rose together" in fired[0] and "pg_clipfrac" not in fired[0]
    assert len(fired) == 2 and "perception KL" in fired[1]        # then the KL alarm: another sign, once


EXPERIMENT = json.loads((Path(__file__).parent / "data" / "experiment_step_traces.json").read_text())


def test_a_break_within_the_last_step_is_flagged_and_the_39_healthy_runs_stay_quiet():
    fired = {name: _warnings({"reward": run["ppo_kl"], **run}) for name, run in EXPERIMENT["runs"].items()}
    broken = fired.pop(EXPERIMENT["broken"])
    assert [step for step, _ in broken] == [60] and "within this step" in broken[0][1]
    assert "0.101 -> 0.234" in broken[0][1] and "moved 0.0489 nats" in broken[0][1]
    assert len(fired) == 39 and {name: w for name, w in fired.items() if w} == {}


def test_drift_needs_both_signs():
    base = {"ref_kl": 0.10, "ppo_kl": 0.001}
    for now in ({"ref_kl": 0.25, "ppo_kl": 0.002}, {"ref_kl": 0.11, "ppo_kl": 0.05}, {"ppo_kl": 0.05}):
        det = CollapseDetector()
        det.update(base)
        assert det.update(now) is None, now
    det = CollapseDetector()
    det.update(base)
    assert "within this step" in det.update({"ref_kl": 0.19, "ppo_kl": 0.031})


def test_a_later_sign_is_printed_even_after_an_earlier_one(capsys):
    from megatron_papo.training.logging import RunLogger

    logger = RunLogger(None, progress=False)
    steps = [{"perception_kl": 0.6, "ref_kl": 0.1, "ppo_kl": 0.001}] * 3 + [{"perception_kl": 0.6, "ref_kl": 0.25,
                                                                            "ppo_kl": 0.05}]
    for step, m in enumerate(steps, 1):
        logger.log_step(step, len(steps), {f"actor/{k}": v for k, v in m.items()})
    err = capsys.readouterr().err
    assert err.count("perception KL 0.600 > 0.5") == 1 and err.count("within this step") == 1
