import pytest

from megatron_papo.config import ALGORITHM_PRESETS, ConfigError, describe_fields, load_config


def test_defaults_validate_and_presets_fill_fields():
    cfg = load_config()
    assert cfg.algorithm.preset == "papo_g" and cfg.algorithm.gamma == 0.02 and cfg.algorithm.beta == 0.01
    d = load_config(overrides=["algorithm.preset=papo_d"]).algorithm
    assert (d.gamma, d.eta1, d.eta2, d.eps_high, d.beta, d.dynamic_sampling) == (0.01, 0.03, 0.03, 0.28, 0.0, True)
    g = load_config(overrides=["algorithm.preset=grpo", "algorithm.eps_high=0.25"]).algorithm
    assert g.gamma == 0.0 and g.eps_high == 0.25  # explicit fields beat the preset
    assert set(ALGORITHM_PRESETS) == {"grpo", "dapo", "papo_g", "papo_d", "vppo"}


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  rl_steps: 7\nrollout:\n  top_p: 0.9\nmodel:\n  fp8: null\n")
    cfg = load_config(p, ["training.seed=3", "rollout.stop=a,b", "model.freeze_vision=true"])
    assert (cfg.training.rl_steps, cfg.training.seed, cfg.rollout.top_p) == (7, 3, 0.9)
    assert cfg.rollout.stop == ["a", "b"] and cfg.model.freeze_vision is True


@pytest.mark.parametrize("overrides, needle", [
    (["training.rl_step=3"], "unknown key(s) rl_step in training"),
    (["nonsense.x=1"], "unknown key(s) nonsense"),
    (["training.rl_steps=abc"], "training.rl_steps: expected int"),
    (["rollout.top_p=1.5"], "rollout.top_p must be in (0, 1]"),
    (["algorithm.preset=ppo"], "algorithm.preset: unknown preset 'ppo'"),
    (["model.fp8=e4m3"], "model.fp8 needs model.transformer_impl=transformer_engine"),
    (["training.prompts_per_step=10", "training.prompts_per_update=4"], "must be a multiple"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs"),
    (["rollout.n"], "expected key=value"),
    (["data.eval_shards=data/eval"], "data.eval_shards was removed (nothing read it); set data.val_shards"),
])
def test_bad_config_names_field_and_fix(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_removed_eval_shards_null_is_dropped(tmp_path):
    """Configs saved by older runs list data.eval_shards: null; they still load (the field itself is gone)."""
    p = tmp_path / "old.yaml"
    p.write_text("data:\n  eval_shards: null\n  val_shards: v\n")
    cfg = load_config(p)
    assert cfg.data.val_shards == "v" and not hasattr(cfg.data, "eval_shards")


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/c.yaml")


def test_every_field_documented():
    fields = describe_fields()
    assert len(fields) > 60
    undocumented = [name for name, doc in fields if not doc]
    assert not undocumented, undocumented


def test_cli_bad_config_is_one_line_error(capsys):
    from megatron_papo.cli import main

    assert main(["train", "--config", "/nonexistent.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-papo train: error:") and "does not exist" in err and "\n" not in err
