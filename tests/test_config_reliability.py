"""Configuration mistakes end in one line naming the field, before any model is built; numbers must be finite;
``rollout.temperature=0`` trains with greedy decoding; a run whose optimizer steps keep being skipped stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_papo.config import ConfigError, load_config
from megatron_papo.training.entry import default_config_tree

ROOT = Path(__file__).resolve().parents[1]

BAD = {
    "optimizer.lr=inf": "optimizer.lr",
    "algorithm.beta=.inf": "algorithm.beta",
    "algorithm.gamma=nan": "algorithm.gamma",
    "rollout.top_p=nan": "rollout.top_p",
    "rollout.max_new_tokens=0": "rollout.max_new_tokens",
    "training.rl_steps=[1, 2]": "training.rl_steps",
    "training.micro_batch_size={a: 1}": "training.micro_batch_size",
    "optimizer.lr=[0.1]": "optimizer.lr",
    "algorithm.dynamic_sampling_max_tries=0": "algorithm.dynamic_sampling_max_tries",
    "training.seed=-1": "training.seed",
    "training.reward_timeout_s=-1": "training.reward_timeout_s",
}


@pytest.mark.parametrize("override", sorted(BAD))
def test_bad_value_names_the_field(override):
    with pytest.raises(ConfigError, match=BAD[override].replace(".", r"\.")):
        load_config(None, [override], base=default_config_tree())


def test_checkpoint_dir_that_is_a_file(tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="checkpoint.dir.*is a file"):
        load_config(None, [f"checkpoint.dir={f}"], base=default_config_tree())


def test_cli_prints_one_line_and_exits_2(capsys):
    from megatron_papo.cli import main

    assert main(["train", "--set", "training.rl_steps=[3]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.rl_steps" in err[0]


def test_consecutive_skipped_steps_stop_the_run():
    from megatron_papo.config import Config
    from megatron_papo.training.trainer import NonFiniteTraining, _check_skipped

    cfg = Config()
    cfg.training.max_skipped_steps = 3
    run = SimpleNamespace(ctx=SimpleNamespace(cfg=cfg), skipped_in_a_row=0)
    _check_skipped(run, {"actor/skipped": 1.0}, 1)
    _check_skipped(run, {"actor/skipped": 0.0}, 2)                  # a good step resets the count
    _check_skipped(run, {"actor/skipped": 2.0}, 3)
    _check_skipped(run, {"actor/skipped": 1.0}, 4)
    with pytest.raises(NonFiniteTraining, match="steps 3..5.*max_skipped_steps=3"):
        _check_skipped(run, {"actor/skipped": 1.0}, 5)


def test_temperature_zero_trains_greedily(tmp_path):
    from megatron_papo.training.trainer import greedy_as_top1

    cfg = greedy_as_top1(load_config(None, ["rollout.temperature=0"], base=default_config_tree()))
    assert (cfg.rollout.temperature, cfg.rollout.top_k) == (1.0, 1)
    sets = [f"data.train_shards={tmp_path / 'data'}", "data.synthetic_samples=16", "rollout.n=2",
            "rollout.max_new_tokens=4", "training.prompts_per_step=2", "training.prompts_per_update=2",
            "training.micro_batch_size=4", "training.warmup_sft_steps=0", "training.rl_steps=1",
            "rollout.temperature=0", f"checkpoint.dir={tmp_path / 'ck'}", "logging.tensorboard_dir=null",
            "logging.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "megatron_papo.cli", "train", *[a for s in sets for a in ("--set", s)]],
                         env=env, text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1/1" in out.stdout
