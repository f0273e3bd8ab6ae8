"""Qwen3-VL presets and recipes against published figures (copied from the sources named here, not from the code).

Dimensions: the config.json of Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct on Hugging Face (Thinking checkpoints share
them). Totals: the parameter counts Hugging Face shows for those checkpoints (safetensors metadata): 2.13B,
4.44B, 8.77B, 33.4B; ``--dry-run`` must land within 0.5%.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_papo.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# layers, hidden, heads, kv heads, head_dim, MLP, vocab, tied | vision depth, width, MLP, deepstack blocks
PUBLISHED = {
    "qwen3-vl-2b": ((28, 2048, 16, 8, 128, 6144, 151936, True), (24, 1024, 4096, (5, 11, 17))),
    "qwen3-vl-4b": ((36, 2560, 32, 8, 128, 9728, 151936, True), (24, 1024, 4096, (5, 11, 17))),
    "qwen3-vl-8b": ((36, 4096, 32, 8, 128, 12288, 151936, False), (27, 1152, 4304, (8, 16, 24))),
    "qwen3-vl-32b": ((64, 5120, 64, 8, 128, 25600, 151936, False), (27, 1152, 4304, (8, 16, 24))),
}
PUBLISHED_TOTAL_B = {"qwen3-vl-2b": 2.13, "qwen3-vl-4b": 4.44, "qwen3-vl-8b": 8.77, "qwen3-vl-32b": 33.4}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_match_published_dimensions_and_totals(preset):
    from megatron_papo.models import get_preset
    from megatron_papo.training.layout import params_per_stage

    s = get_preset(preset)
    s.validate()
    lm, vis = PUBLISHED[preset]
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size, s.vocab_size,
            s.tie_word_embeddings) == lm
    v = s.vision
    assert (v.depth, v.hidden_size, v.intermediate_size, v.deepstack_visual_indexes) == vis
    assert (v.num_heads, v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.num_position_embeddings) == \
        (16, 16, 2, 2, 2304)
    assert (s.mrope_section, s.rope_theta, v.out_hidden_size) == ((24, 20, 20), 5_000_000.0, s.hidden_size)
    total = params_per_stage(load_config(None, [f"model.preset={preset}"]))[0] / 1e9  # TP1 x PP1: one stage
    assert total == pytest.approx(PUBLISHED_TOTAL_B[preset], rel=0.005)


@pytest.mark.parametrize("size", ["4b", "8b", "32b"])
def test_recipes_dry_run(size, tmp_path, monkeypatch, capsys):
    """`megatron-papo train --config examples/qwen3-vl-<size>_papo_g.yaml --dry-run` at the recipe's world size."""
    from megatron_papo.cli import main
    from megatron_papo.models.qwen3_vl.configs import check_tp_divisibility

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    path = EXAMPLES / f"qwen3-vl-{size}_papo_g.yaml"
    cfg = load_config(path)
    p = cfg.parallel
    assert cfg.model.preset == f"qwen3-vl-{size}" and cfg.algorithm.preset == "papo_g"
    assert cfg.algorithm.mask_patch_size is None and cfg.data.min_pixels % (32 * 32) == 0
    from megatron_papo.models import get_preset

    check_tp_divisibility(get_preset(cfg.model.preset), p.tensor_model_parallel_size)
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"world {p.world_size} = TP {p.tensor_model_parallel_size} x PP "
                     rf"{p.pipeline_model_parallel_size} x DP", out), out
    total = float(re.search(r"model total ~([\d.]+)B", out).group(1))
    assert total == pytest.approx(PUBLISHED_TOTAL_B[cfg.model.preset], rel=0.005), out
    if size == "32b":
        assert p.world_size > 8 and p.pipeline_model_parallel_size > 1 and p.tensor_model_parallel_size > 1
