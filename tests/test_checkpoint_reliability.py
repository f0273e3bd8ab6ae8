"""Checkpoints that are broken, cut short or from another lineage: ``resume: auto`` passes over incomplete ones and
names the file, unreadable files are named on load, a roll-back never prunes what the new run writes, a full
disk leaves the previous checkpoints intact, and a changed learning rate on resume is applied (or kept on request)
with one line. A tiny megatron GPTModel (tests/test_checkpoint.py) saved through the real dist checkpointing."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from multirank import run_multirank
from test_checkpoint import _build, _train_step


def _names(d) -> list[str]:
    return sorted(p.name for p in Path(d).iterdir() if p.name.startswith("step_"))


def _body(rank, world, root):
    import megatron_papo.training.checkpoint as ck
    from megatron_papo.training.checkpoint import CheckpointError, find_resume, load_checkpoint, save_checkpoint

    d = os.path.join(root, "ck")
    ddp, opt, sched = _build(seed=7)
    reader = {"pos": 0}
    out = {}
    for step in (1, 2, 3):
        _train_step(ddp, opt, sched, reader)
        save_checkpoint(d, step, [ddp], opt, sched, reader_state=dict(reader), config={}, keep_last=2)
    out["kept"] = _names(d)
    # roll back to step_2: step_3 belongs to the abandoned lineage and is moved aside, never pruned or resumed
    moved = ck.set_aside_later(d, 2, fresh=False)
    for step in (3, 4):
        save_checkpoint(d, step, [ddp], opt, sched, reader_state=dict(reader), config={}, keep_last=2)
    out["after_rollback"], out["moved"] = _names(d), _names(moved)
    # a cut shard file in the newest: auto falls back with a warning naming it; loading it names it too
    shard = sorted(Path(d, "step_4").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    Path(d, "step_5").mkdir()                                    # an empty step directory is not a checkpoint
    warnings = []
    out["auto"] = find_resume("auto", d, warn=warnings.append).name
    out["warnings"] = warnings
    with pytest.raises(CheckpointError) as bad:
        load_checkpoint(Path(d, "step_4"), [ddp], opt, sched)
    out["load_error"] = str(bad.value)
    with pytest.raises(CheckpointError) as explicit:
        find_resume(str(Path(d, "step_4")), d)
    out["explicit_error"] = str(explicit.value)
    # disk full while writing: one line naming the directory and the bytes, no partial step left, older intact
    real = ck.dist_checkpointing.save

    def full(sd, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    ck.dist_checkpointing.save = full
    try:
        with pytest.raises(CheckpointError) as disk:
            save_checkpoint(d, 6, [ddp], opt, sched, reader_state=dict(reader), config={}, keep_last=1)
    finally:
        ck.dist_checkpointing.save = real
    real_usage = ck.shutil.disk_usage
    ck.shutil.disk_usage = lambda path: SimpleNamespace(free=1000)   # too little for a checkpoint's size
    try:
        with pytest.raises(CheckpointError) as early:
            save_checkpoint(d, 7, [ddp], opt, sched, reader_state=dict(reader), config={})
    finally:
        ck.shutil.disk_usage = real_usage
    out["early_error"] = str(early.value)
    out["disk_error"], out["after_full"] = str(disk.value), _names(d)
    out["step3_ok"] = ck.verify_checkpoint(Path(d, "step_3"))
    out["lr"] = _lr_override(opt, sched)
    return out


def _lr_override(opt, sched) -> dict:
    from megatron_papo.config import Config, OptimizerConfig
    from megatron_papo.training.resume import _lr_schedule

    lines = []
    res = {}
    for override in (False, True):
        cfg = Config(optimizer=OptimizerConfig(lr=5e-3, warmup_steps=2, schedule="cosine"))
        cfg.checkpoint.override_lr_schedule = override
        run = SimpleNamespace(ctx=SimpleNamespace(cfg=cfg, scheduler=sched, optimizer=opt),
                              logger=SimpleNamespace(info=lines.append))
        _lr_schedule(run, {"config": {"optimizer": {"lr": 1e-2, "warmup_steps": 2, "schedule": "cosine"}}})
        res[override] = sched.max_lr
    return {"max_lr": res, "lines": lines}


def test_broken_and_rolled_back_checkpoints(tmp_path):
    (out,) = run_multirank(_body, 1, args=(str(tmp_path),), tp=1)
    assert out["kept"] == ["step_2", "step_3"]
    assert out["after_rollback"] == ["step_3", "step_4"] and out["moved"] == ["step_3"]
    assert out["auto"] == "step_3"
    assert any("step_5" in w for w in out["warnings"]) and any(".distcp" in w for w in out["warnings"])
    assert ".distcp" in out["load_error"] and "step_4" in out["load_error"]
    assert ".distcp" in out["explicit_error"]
    assert "disk full" in out["disk_error"] and str(tmp_path / "ck") in out["disk_error"]
    assert "bytes needed" in out["disk_error"]
    assert out["after_full"] == ["step_3", "step_4", "step_5"] and out["step3_ok"] is None
    assert not (tmp_path / "ck" / "step_6.tmp").exists() and not (tmp_path / "ck" / "step_7.tmp").exists()
    assert "bytes needed, 1,000 free" in out["early_error"]
    assert out["lr"]["max_lr"] == {False: 1e-2, True: 5e-3}
    assert "override_lr_schedule=true" in out["lr"]["lines"][0] and "1e-2" not in out["lr"]["lines"][0]


def test_reader_position_that_no_longer_applies_restarts_with_one_line():
    from megatron_papo.config import Config
    from megatron_papo.training.resume import _reader_state

    class Reader:
        def load_state_dict(self, state):
            raise ValueError("saved with other shards")

    lines = []
    run = SimpleNamespace(ctx=SimpleNamespace(cfg=Config(), dp_size=2), reader=Reader(),
                          logger=SimpleNamespace(info=lines.append))
    _reader_state(run, {"reader_state": {"fingerprint": "x"}, "layout": {"dp": 2}})
    _reader_state(run, {"reader_state": None, "layout": {"dp": 1}})
    assert "shards" in lines[0] and "afresh" in lines[0]
    assert "data-parallel size 1" in lines[1]
