"""What a new user meets first: shard tools that never mix old and new shards, no silent synthetic data, one-line
errors instead of tracebacks, help that shows defaults, one tensorboard run per run, docs that stand alone."""

from __future__ import annotations

import importlib.util
import io
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_shards_refuse_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    tool = _tool("make_synthetic_shards")
    out = tmp_path / "d"
    assert tool.main(["--out", str(out), "--num-samples", "8", "--samples-per-shard", "4"]) == 0
    assert tool.main(["--out", str(out), "--num-samples", "4", "--samples-per-shard", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tool.main(["--out", str(out), "--num-samples", "4", "--samples-per-shard", "4", "--overwrite"]) == 0
    assert len(list(out.glob("*.tar"))) == 1


def test_make_shards_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old-000000.tar").write_bytes(b"x")
    src = tmp_path / "a.jsonl"
    src.write_text('{"question": "q", "answer": "1"}\n')
    assert _tool("make_shards").main([str(src), "--out", str(tmp_path / "d")]) == 2
    assert "already holds 1 .tar" in capsys.readouterr().err


def test_a_config_without_synthetic_data_does_not_invent_it(tmp_path):
    from megatron_papo.config import load_config
    from megatron_papo.training.trainer import build_data

    typo = tmp_path / "virl39k" / "trian"
    cfg = load_config(None, [f"data.train_shards={typo}"])
    assert cfg.data.synthetic_if_missing is False
    with pytest.raises(ValueError, match="does not exist"):
        build_data(cfg)
    assert not typo.exists()


def test_generate_with_a_file_that_is_not_an_image(tmp_path, capsys):
    from megatron_papo.cli import main

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    from megatron_papo.rollout.cli import _open_image

    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        _open_image(str(bad))


def test_generate_help_shows_defaults(capsys):
    from megatron_papo.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 256)" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [(["--hf", "/nonexistent", "--mcore", "/nonexistent"], "--hf"),
                                         (["--tp", "0"], "--tp must be >= 1")])
def test_verify_conversion_one_line_errors(tmp_path, capsys, args, needle):
    if args[0] == "--tp":
        args = ["--hf", str(tmp_path), "--mcore", str(tmp_path), *args]
    assert _tool("verify_conversion").main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_tp_error_for_7b_names_the_kv_heads_and_world_size_error_names_the_field():
    from megatron_papo.config import load_config
    from megatron_papo.training.layout import describe_layout

    cfg = load_config(None, ["model.preset=qwen2.5-vl-7b", "parallel.tensor_model_parallel_size=7",
                             "parallel.world_size=7", "training.prompts_per_step=7", "training.prompts_per_update=7"])
    with pytest.raises(ValueError, match="4 key/value heads"):
        describe_layout(cfg)
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2", "parallel.world_size=3"])
    with pytest.raises(ValueError, match="parallel.world_size"):
        describe_layout(cfg)


def test_each_run_gets_its_own_tensorboard_directory(tmp_path):
    from megatron_papo.training.logging import RunLogger

    a, b = RunLogger(str(tmp_path)), RunLogger(str(tmp_path))
    a.close(), b.close()
    assert a.run_dir != b.run_dir and {Path(a.run_dir).parent, Path(b.run_dir).parent} == {tmp_path}


def test_collapse_warning_is_printed_once(capsys):
    from megatron_papo.training.logging import RunLogger

    logger = RunLogger(None, progress=False)
    for step in range(1, 4):
        logger.log_step(step, 3, {"actor/perception_kl": 0.9, "actor/pg_clipfrac": 0.1, "actor/nll": 1.0,
                                  "actor/mask_nll": 1.0})
    assert capsys.readouterr().err.count("possible PAPO collapse") == 1


def test_repository_docs_stand_alone():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    banned = ["PAPO" + ".md", "DESIGN" + ".md", "MEGATRON_ON_CPU" + ".md", "shared" + "/"]
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".jpg", ".tar", ".model"):
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{name}: {b}" for b in banned if b in text]
    assert hits == []
    assert (ROOT / "docs" / "algorithm.md").is_file()
