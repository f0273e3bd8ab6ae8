"""Checkpoints damaged in place (same size): the CRC32 in complete.json catches them before the load, ``resume=auto``
falls back to the next older checkpoint and says so, a load that fails on one rank only is agreed on by every rank
(no deadlock), an explicit ``checkpoint.resume=<dir>`` that fails is an error. Two gloo ranks (DP=2), the tiny
megatron GPTModel of tests/test_checkpoint.py saved and loaded through the real dist checkpointing; then the
trainer end to end (tiny VLM, one rank): resume=auto passes over a damaged newest checkpoint and says so, and the
run validates its last step."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from multirank import run_multirank
from test_checkpoint import _build, _train_step


def _damage(path: Path, how: str) -> None:
    """Same size, different bytes: one flipped bit in the middle, or a zeroed 256-byte block."""
    data = bytearray(path.read_bytes())
    before, n = bytes(data), len(data)
    if how == "flip":
        data[n // 2] ^= 0x10
    else:
        data[n // 3:n // 3 + 256] = bytes(len(data[n // 3:n // 3 + 256]))
    assert bytes(data) != before, f"{path}: those bytes were zero already"
    path.write_bytes(bytes(data))


def _run(ddp, opt, sched, ckpt_dir, checksums, resume="auto"):
    from megatron_papo.config import Config

    cfg = Config()
    cfg.checkpoint.dir, cfg.checkpoint.checksums, cfg.checkpoint.resume = ckpt_dir, checksums, resume
    notes = []
    ctx = SimpleNamespace(cfg=cfg, policy=ddp, optimizer=opt, scheduler=sched, reference=None)
    return SimpleNamespace(ctx=ctx, logger=SimpleNamespace(note=notes.append, info=notes.append)), notes


def _weights(ddp):
    return {k: v.detach().clone() for k, v in ddp.module.state_dict().items() if "_extra_state" not in k}


def _body(rank, world, root):
    import torch

    import megatron_papo.training.checkpoint as ck
    from megatron_papo.training.resume import _load_newest, resume

    d = os.path.join(root, "ck")
    ddp, opt, sched = _build(seed=7)
    reader, saved = {"pos": 0}, {}
    for step in (1, 2, 3):
        _train_step(ddp, opt, sched, reader)
        ck.save_checkpoint(d, step, [ddp], opt, sched, reader_state=dict(reader), config={})
        saved[step] = _weights(ddp)
    ck._barrier()
    if rank == 0:
        _damage(sorted(Path(d, "step_2").glob("*.distcp"))[0], "flip")      # loads silently without checksums
        _damage(Path(d, "step_3", ".metadata"), "zero")                       # fails at load
    ck._barrier()
    out = {"sizes_ok": [ck.verify_checkpoint(Path(d, f"step_{s}")) for s in (2, 3)]}

    run, notes = _run(ddp, opt, sched, d, checksums=True)
    path, info = _load_newest(run)                      # both damaged ones fail their checksum: step_1
    out["with_crc"] = (path.name, info["step"], notes)
    out["with_crc_weights"] = all(torch.equal(v, saved[1][k]) for k, v in _weights(ddp).items())

    # without checksums step_3 passes the size check and fails at load, and step_2 fails on rank 1 only (a read
    # error on one node): every rank must agree and fall back to step_1 together
    real = ck.dist_checkpointing.load_common_state_dict

    def rank1_fails(path, *a, **k):
        if rank == 1 and "step_2" in str(path):
            raise OSError(5, "Input/output error")
        return real(path, *a, **k)
    ck.dist_checkpointing.load_common_state_dict = rank1_fails
    try:
        run, notes = _run(ddp, opt, sched, d, checksums=False)
        path, info = _load_newest(run)
    finally:
        ck.dist_checkpointing.load_common_state_dict = real
    out["without_crc"] = (path.name, info["step"], notes)

    run, _ = _run(ddp, opt, sched, d, checksums=False, resume=str(Path(d, "step_3")))
    with pytest.raises(ck.CheckpointError) as explicit_load:
        resume(run)
    run, _ = _run(ddp, opt, sched, d, checksums=True, resume=str(Path(d, "step_2")))
    with pytest.raises(ck.CheckpointError) as explicit_crc:
        resume(run)
    out["explicit"] = (str(explicit_load.value), str(explicit_crc.value))

    if rank == 0:
        ck.shutil.copytree(Path(d, "step_3"), Path(root, "only", "step_3"))
    ck._barrier()
    run, notes = _run(ddp, opt, sched, os.path.join(root, "only"), checksums=False)
    with pytest.raises(ck.CheckpointError) as none_loaded:
        _load_newest(run)
    out["none_loaded"] = str(none_loaded.value)
    out["kept"] = sorted(p.name for p in Path(d).iterdir())
    return out


def test_damaged_checkpoints_fall_back_on_every_rank(tmp_path, capsys):
    outs = run_multirank(_body, 2, args=(str(tmp_path),), tp=1, timeout=300)
    for out in outs:
        assert out["sizes_ok"] == [None, None]           # same size: the size check alone cannot see it
        name, step, notes = out["with_crc"]
        assert (name, step) == ("step_1", 1) and out["with_crc_weights"]
        assert len(notes) == 2 and "step_3" in notes[0] and ".metadata fails its checksum" in notes[0]
        assert "step_2" in notes[1] and ".distcp fails its checksum" in notes[1]
        name, step, notes = out["without_crc"]
        assert (name, step) == ("step_1", 1)
        assert len(notes) == 2 and all("failed to load" in n and "falling back" in n for n in notes)
        assert "step_3" in notes[0] and "step_2" in notes[1] and "Input/output error" in notes[1]
        load_err, crc_err = out["explicit"]
        assert "step_3" in load_err and "cannot be read" in load_err
        assert "checkpoint.resume" in crc_err and ".distcp fails its checksum" in crc_err
        assert "none of the checkpoints" in out["none_loaded"] and "step_3" in out["none_loaded"]
        assert out["kept"] == ["step_1", "step_2", "step_3"]          # nothing deleted or moved
    if outs[0]["without_crc"][2] != outs[1]["without_crc"][2]:
        pytest.fail("ranks named different errors")
    _check_tool(tmp_path / "ck", capsys)


def _check_tool(ckpt_dir, capsys):
    """tools/verify_checkpoint.py on the same directory: the damaged two named, exit status 1."""
    path = Path(__file__).resolve().parents[1] / "tools" / "verify_checkpoint.py"
    spec = importlib.util.spec_from_file_location("verify_checkpoint", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    assert tool.main([str(ckpt_dir)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("step_1: ok") and "__0_" in lines[1] and "fails its checksum" in lines[1]
    assert ".metadata fails its checksum" in lines[2] and lines[-1] == "1 ok, 2 damaged"
    assert tool.main([str(ckpt_dir), "--sizes-only"]) == 0
    assert tool.main([str(ckpt_dir / "step_1")]) == 0


def _train_body(rank, world, root):
    """The trainer end to end: 2 steps with a checkpoint each, the newest damaged in place, then resume=auto."""
    import contextlib
    import glob
    import io

    from megatron_papo.config import load_config
    from megatron_papo.training.entry import default_config_tree
    from megatron_papo.training.trainer import run_training

    def cfg(steps):
        return load_config(None, [
            f"data.train_shards={root}/data", "data.synthetic_samples=24", "data.shuffle_buffer=0", "rollout.n=2",
            "rollout.max_new_tokens=4", "training.prompts_per_step=2", "training.prompts_per_update=1",
            "training.micro_batch_size=4", "training.warmup_sft_steps=0", f"training.rl_steps={steps}",
            "checkpoint.save_interval=1", "checkpoint.keep_last=0", "checkpoint.resume=auto",
            f"checkpoint.dir={root}/ck", f"logging.tensorboard_dir={root}/tb",
            "logging.progress=false", f"data.val_shards={root}/data", "training.eval_interval=2",
            "training.eval_limit=3", "training.eval_k=2"], base=default_config_tree())
    run_training(cfg(2))
    _damage(sorted(Path(root, "ck", "step_2").glob("*.distcp"))[0], "flip")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_training(cfg(3))
    events = b"".join(Path(f).read_bytes() for f in glob.glob(f"{root}/tb/**/events.out.tfevents.*", recursive=True))
    return {"lines": out.getvalue().splitlines(), "steps": sorted(p.name for p in Path(root, "ck").glob("step_*")),
            "abandoned": sorted(p.name for p in Path(root, "ck").glob("abandoned/*/step_*")),
            "tb_note": b"fails its checksum" in events}


def test_trainer_resumes_from_the_older_checkpoint_and_validates_its_last_step(tmp_path):
    (res,) = run_multirank(_train_body, 1, args=(str(tmp_path),), timeout=300)
    lines = res["lines"]
    warned = [ln for ln in lines if ln.startswith("WARNING: checkpoint.resume=auto: passing over")]
    assert len(warned) == 1, "\n".join(lines[:12])
    assert "step_2" in warned[0] and ".distcp fails its checksum" in warned[0]
    assert any(ln.startswith("resumed from") and ln.split()[2].endswith("step_1") for ln in lines)
    assert res["tb_note"]
    assert res["abandoned"] == ["step_2"] and res["steps"] == ["step_1", "step_2", "step_3"]   # kept, not deleted
    assert [ln.split(":")[0] for ln in lines if ln.startswith("validation step")] == ["validation step 2",
                                                                                     "validation step 3"]


def test_manifest_without_checksums_is_checked_by_size(tmp_path):
    """complete.json of older runs has sizes only: still usable; with checksums a same-size change is named."""
    from megatron_papo.training.checkpoint_manifest import MANIFEST, verify_checkpoint, write_manifest

    for name in ("metadata.json", "common.pt", ".metadata", "__0_0.distcp"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    write_manifest(tmp_path)                                        # sizes only, as before checksums
    assert "crc32" not in (tmp_path / MANIFEST).read_text()
    _damage(tmp_path / "__0_0.distcp", "flip")
    assert verify_checkpoint(tmp_path, checksums=True) is None
    write_manifest(tmp_path, checksums={})                          # every file checksummed here
    assert verify_checkpoint(tmp_path, checksums=True) is None
    _damage(tmp_path / "common.pt", "flip")
    assert verify_checkpoint(tmp_path) is None                      # same size
    assert "common.pt fails its checksum" in verify_checkpoint(tmp_path, checksums=True)
