"""In-training validation (training.eval_interval + data.val_shards): val/ metrics reach tensorboard every N RL
steps, and a run with validation trains exactly as one without (validation draws no training randomness)."""

from __future__ import annotations

import pytest

from multirank import run_multirank


def _train(root: str, validate: bool) -> dict:
    from megatron_papo.config import load_config
    from megatron_papo.training.entry import default_config_tree
    from megatron_papo.training.trainer import build_run, train_loop

    tb = f"{root}/tb_{int(validate)}"
    sets = [f"data.train_shards={root}/data", "data.synthetic_samples=24", "data.shuffle_buffer=0", "rollout.n=2",
            "rollout.max_new_tokens=4", "training.prompts_per_step=2", "training.prompts_per_update=2",
            "training.micro_batch_size=4", "training.warmup_sft_steps=0", "training.rl_steps=2",
            f"checkpoint.dir={root}/ckpt_{int(validate)}", f"logging.tensorboard_dir={tb}", "logging.progress=false"]
    if validate:
        sets += [f"data.val_shards={root}/data", "training.eval_interval=2", "training.eval_limit=3",
                 "training.eval_k=2"]
    run = build_run(load_config(None, sets, base=default_config_tree()))
    out = train_loop(run)
    run.logger.close()
    import glob

    events = b"".join(open(f, "rb").read() for f in glob.glob(f"{tb}/**/events.out.tfevents.*", recursive=True))
    return {"rewards": out["rewards"], "tags": [t for t in ("val/avg@k", "val/reliance_masked", "val/kl_exact")
                                                if t.encode() in events]}


def _body(rank, world_size, root):
    return {"plain": _train(root, False), "validated": _train(root, True)}


def test_validation_logs_and_leaves_training_unchanged(tmp_path):
    res = run_multirank(_body, world_size=1, args=(str(tmp_path),))[0]
    assert res["validated"]["tags"] == ["val/avg@k", "val/reliance_masked", "val/kl_exact"]
    assert res["plain"]["tags"] == []
    assert res["validated"]["rewards"] == res["plain"]["rewards"]


def test_eval_interval_needs_val_shards():
    from megatron_papo.config import ConfigError, load_config
    from megatron_papo.training.entry import default_config_tree

    with pytest.raises(ConfigError, match="training.eval_interval > 0 needs data.val_shards"):
        load_config(None, ["training.eval_interval=5", "data.val_shards=null"], base=default_config_tree())
    with pytest.raises(ConfigError, match="training.eval_k must be >= 1"):
        load_config(None, ["training.eval_k=0"], base=default_config_tree())
