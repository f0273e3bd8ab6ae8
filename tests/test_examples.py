"""The example recipes: every YAML validates, carries the published hyper-parameters, and fits its layout.

The reference numbers below are copied from the papers / Hugging Face config.json files, not from the code under
test, so a wrong preset or a drifting recipe fails here.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from megatron_papo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
YAMLS = sorted(EXAMPLES.glob("*.yaml"))
RECIPES = {f"qwen2.5-vl-{size}_{algo}": (size, algo)
           for size in ("3b", "7b") for algo in ("papo_g", "papo_d", "grpo", "dapo")}
SCALED = ["qwen2.5-vl-3b_papo_g", "qwen2.5-vl-7b_papo_g", "qwen2.5-vl-72b_papo_g"]

# Published model dimensions (Qwen2.5-VL-*-Instruct config.json): layers, hidden, heads, kv heads, MLP, vocab, tied.
PUBLISHED_DIMS = {
    "qwen2.5-vl-3b": (36, 2048, 16, 2, 11008, 151936, True),
    "qwen2.5-vl-7b": (28, 3584, 28, 4, 18944, 152064, False),
    "qwen2.5-vl-32b": (64, 5120, 40, 8, 27648, 152064, False),
    "qwen2.5-vl-72b": (80, 8192, 64, 8, 29568, 152064, False),
}
# Published vision tower (all sizes): depth 32, width 1280, 16 heads, patch 14, merge 2; MLP 3420 (3B/7B), 3456.
PUBLISHED_VISION_MLP = {"qwen2.5-vl-3b": 3420, "qwen2.5-vl-7b": 3420, "qwen2.5-vl-32b": 3456, "qwen2.5-vl-72b": 3456}

# PAPO paper section 3 (docs/algorithm.md): per algorithm and per size.
PUBLISHED_ALGO = {
    "grpo": dict(eps_low=0.2, eps_high=0.3, beta=0.01, gamma=0.0, eta1=0.0, eta2=0.0, dynamic_sampling=False),
    "papo_g": dict(eps_low=0.2, eps_high=0.3, beta=0.01, gamma=0.02, dynamic_sampling=False),
    "dapo": dict(eps_low=0.2, eps_high=0.28, beta=0.0, gamma=0.0, eta1=0.0, eta2=0.0, dynamic_sampling=True),
    "papo_d": dict(eps_low=0.2, eps_high=0.28, beta=0.0, gamma=0.01, eta1=0.03, eta2=0.03, dynamic_sampling=True),
}
PUBLISHED_ETA_PAPO_G = {"3b": 0.0, "7b": 0.05}


def _load(name: str):
    return load_config(EXAMPLES / f"{name}.yaml")


def test_all_expected_examples_exist():
    names = {p.stem for p in YAMLS}
    missing = (set(RECIPES) | set(SCALED) | {"tiny_cpu"}) - names
    assert not missing, f"missing example presets: {sorted(missing)}"


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_example_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.parallel.world_size >= 1, f"{path.name}: set parallel.world_size (used by --dry-run)"
    # The loader rejects unknown keys: prove it is strict on these files' sections, so a pass above means something.
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["training.no_such_field=1"])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_has_published_hyperparameters(name):
    size, algo = RECIPES[name]
    cfg = _load(name)
    assert cfg.model.preset == f"qwen2.5-vl-{size}"
    assert cfg.algorithm.preset == algo
    expected = dict(PUBLISHED_ALGO[algo], dual_clip_c=3.0)
    if algo == "papo_g":
        expected.update(eta1=PUBLISHED_ETA_PAPO_G[size], eta2=PUBLISHED_ETA_PAPO_G[size])
    got = {k: getattr(cfg.algorithm, k) for k in expected}
    assert got == pytest.approx(expected), name
    assert cfg.algorithm.mask_ratio == 0.6 and cfg.algorithm.mask_patch_size in (None, 14)  # None: the family's
    r, t, o, d = cfg.rollout, cfg.training, cfg.optimizer, cfg.data
    assert (r.n, r.temperature, r.top_p, r.max_new_tokens) == (5, 1.0, 0.99, 2048)
    assert (d.max_prompt_length, d.min_pixels, d.max_pixels) == (4096, 256 * 28 * 28, 1280 * 28 * 28)
    assert (t.prompts_per_step, t.prompts_per_update, t.ppo_epochs, t.rl_steps) == (384, 128, 1, 202)
    assert (o.lr, o.weight_decay, o.clip_grad, o.schedule, o.warmup_steps) == (1e-6, 0.01, 1.0, "constant", 0)
    assert cfg.model.params_dtype == "bfloat16" and not cfg.model.freeze_vision
    assert not d.synthetic_if_missing, "a real recipe must not silently train on synthetic data"
    assert d.tokenizer.type == "huggingface"


@pytest.mark.parametrize("name,preset", [("qwen2.5-vl-7b_vppo", "qwen2.5-vl-7b"), ("qwen3-vl-8b_vppo", "qwen3-vl-8b")])
def test_vppo_recipe_has_published_hyperparameters(name, preset):
    """VPPO (arXiv 2510.09285): DAPO base, entropy penalty 0.06, p = 0.4, s_min = 0.9, mask ratio 0.5, n = 8."""
    cfg = _load(name)
    a, r, t = cfg.algorithm, cfg.rollout, cfg.training
    assert (cfg.model.preset, a.preset, a.consumers, a.views) == (preset, "vppo", ["vppo"], ["masked"])
    dapo = dict(PUBLISHED_ALGO["dapo"], eta1=0.06)
    assert {k: getattr(a, k) for k in dapo} == pytest.approx(dapo)
    assert (a.vppo_token_fraction, a.vppo_s_min, a.mask_ratio, a.vppo_stats) == (0.4, 0.9, 0.5, "global")
    assert (r.n, r.temperature, r.top_p, t.prompts_per_step, t.prompts_per_update) == (8, 1.0, 0.99, 384, 128)


@pytest.mark.parametrize("name", SCALED + ["tiny_cpu", "qwen2.5-vl-7b_vppo", "qwen3-vl-8b_vppo"])
def test_layout_divides_world_size(name):
    cfg = _load(name)
    p = cfg.parallel
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    assert p.world_size % mp == 0, f"{name}: TP x PP = {mp} does not divide world_size {p.world_size}"
    dp = p.world_size // mp
    t = cfg.training
    # every data-parallel rank gets whole prompts (all n rollouts of a prompt stay on one rank)
    assert t.prompts_per_step % dp == 0 and t.prompts_per_update % dp == 0, (name, dp)


def test_72b_preset_is_multinode_tp_pp_dp():
    p = _load("qwen2.5-vl-72b_papo_g").parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = p.world_size // (tp * pp)
    assert tp > 1 and pp > 1 and dp > 1, (tp, pp, dp)
    assert tp <= 8, "tensor parallelism should stay inside one 8-GPU node"
    assert p.world_size > 8, "the 72B preset is a multi-node layout"
    assert p.sequence_parallel


@pytest.mark.parametrize("preset", sorted(PUBLISHED_DIMS))
def test_model_presets_match_published_dimensions(preset):
    from megatron_papo.models import get_preset

    s = get_preset(preset)
    got = (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.intermediate_size, s.vocab_size,
           s.tie_word_embeddings)
    assert got == PUBLISHED_DIMS[preset]
    v = s.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == \
        (32, 1280, 16, 14, 2, 2)
    assert v.intermediate_size == PUBLISHED_VISION_MLP[preset]
    assert v.out_hidden_size == s.hidden_size
    assert s.head_dim == 128 and tuple(s.mrope_section) == (16, 24, 24)


@pytest.mark.parametrize("name", SCALED)
def test_recipe_layout_fits_model_dimensions(name):
    """TP must divide every split dimension (heads, KV heads, MLP, vision); PP must divide the layers."""
    from megatron_papo.models import check_tp_divisibility, get_preset

    cfg = _load(name)
    spec = get_preset(cfg.model.preset)
    check_tp_divisibility(spec, cfg.parallel.tensor_model_parallel_size)
    assert spec.num_layers % cfg.parallel.pipeline_model_parallel_size == 0


def _trainer_entry_missing() -> str | None:
    if importlib.util.find_spec("megatron_papo.training.entry") is None:
        return "trainer entry point megatron_papo.training.entry is missing (training helper has not landed it)"
    return None


# Published total parameter counts (Hugging Face model cards of Qwen2.5-VL-*-Instruct), in billions.
PUBLISHED_TOTAL_B = {"qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.29, "qwen2.5-vl-72b": 73.4}


@pytest.mark.skipif(_trainer_entry_missing() is not None, reason=str(_trainer_entry_missing()))
@pytest.mark.parametrize("name", SCALED)
def test_dry_run_builds_layout_and_reports_parameters_per_rank(name, tmp_path, monkeypatch, capsys):
    """`megatron-papo train --config FILE --dry-run` (the CLI's main, in process) for the preset's world size."""
    from megatron_papo.cli import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = _load(name)
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    assert main(["train", "--config", str(EXAMPLES / f"{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    layout = re.search(r"world (\d+) = TP (\d+) x PP (\d+) x DP (\d+)", out)
    assert layout, out
    assert tuple(map(int, layout.groups())) == (p.world_size, tp, pp, p.world_size // (tp * pp))
    per_rank = [float(m.replace(",", "")) * 1e6 for m in re.findall(r"([\d,]+\.\d+)M parameters per rank", out)]
    assert len(per_rank) == pp, out                                  # one line per pipeline stage
    total_b = sum(per_rank) * tp / 1e9                               # each stage's TP shards add up to the model
    assert total_b == pytest.approx(PUBLISHED_TOTAL_B[cfg.model.preset], rel=0.01), out
    assert not list(tmp_path.rglob("step_*")), "--dry-run must not train or save"
