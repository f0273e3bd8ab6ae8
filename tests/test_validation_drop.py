"""A break shows as a significant drop between two validations, and the run validates its final policy so that a
break in the last update is seen. Numbers: the CPU experiment's seed 10, 200 held-out questions at k=4 (per
question correct counts of the warm start and of each arm's final checkpoint,
tests/data/experiment_step_traces.json)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import megatron_papo.evaluation.validation as validation
from megatron_papo.evaluation.validation import Validator, drop_warning, paired_drop

HELD = json.loads((Path(__file__).parent / "data" / "experiment_step_traces.json").read_text())["heldout"]
ACC = {name: {i: c / HELD["k"] for i, c in enumerate(counts)} for name, counts in HELD["correct"].items()}


def test_the_broken_run_is_flagged_and_healthy_ends_are_not():
    a, b, se, n = paired_drop(ACC["warm/seed_10"], ACC["papo_g/seed_10"])
    assert (round(a, 4), round(b, 5), n) == (0.5325, 0.26375, 200) and (a - b) / se > 7
    assert "0.532 -> 0.264 between step 0 and step 60" in drop_warning(ACC["warm/seed_10"], ACC["papo_g/seed_10"],
                                                                       0, 60)
    healthy = [k for k in ACC if k != "papo_g/seed_10"]
    for before in healthy:
        for after in healthy:
            if before != after and not (after == "warm/seed_10"):   # RL progress undone is a real drop: left out
                assert drop_warning(ACC[before], ACC[after], 0, 60) is None, (before, after)


def test_a_small_consistent_drop_is_not_a_break():
    before = {i: 1.0 for i in range(100)}
    after = {i: (0.75 if i < 4 else 1.0) for i in range(100)}          # 0.01 lower, never higher: many SE, tiny
    assert drop_warning(before, after, 1, 2) is None


def _validator(monkeypatch, results):
    v = Validator.__new__(Validator)
    v.interval, v.questions, v.max_prompt_length, v.previous = 5, [], 0, None
    v.settings = SimpleNamespace(k=4)
    calls = []

    def fake_evaluate(*args, **kwargs):
        calls.append(1)
        acc = results[len(calls) - 1]
        records = [{"index": i, "correct": round(x * 4), "k": 4} for i, x in acc.items()]
        m = {key: 0.0 for key in validation._LOGGED}
        return {"datasets": {"overall": m}, "records": records, "skipped": [], "seconds": 0.0}
    monkeypatch.setattr(validation, "evaluate", fake_evaluate)
    return v, calls


def test_the_final_policy_is_validated_and_compared(monkeypatch):
    v, calls = _validator(monkeypatch, [ACC["warm/seed_10"], ACC["papo_g/seed_10"], ACC["grpo/seed_10"]])
    notes = []
    log = SimpleNamespace(writer=None, info=lambda m: None, note=lambda m, step=0: notes.append((step, m)))
    ctx = SimpleNamespace(policy=None, tokenizer=None, processor=None)
    for step in range(1, 8):
        v.maybe_run(ctx, step, log)                                   # validates at step 5
    v.finish(ctx, 7, log)                                             # step 7 was not validated: now it is
    assert len(calls) == 2 and notes and notes[0][0] == 7 and "step 5 and step 7" in notes[0][1]
    v.finish(ctx, 7, log)                                             # already validated: nothing more
    assert len(calls) == 2
