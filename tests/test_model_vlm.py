"""Our megatron Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration on the same weights.

One spawned 2-rank run checks TP=1, TP=2 and PP=2 on three inputs (text only, one image, a batch holding two
images and one image), and KV-cache decoding at TP=2; the rest runs in-process (rope index, specs' error paths, presets).
"""

from __future__ import annotations

import os

import pytest
import torch

import vlm_helpers
from hf_tiny import IMG, VSTART, make_hf_model, tiny_hf_config
from vlm_helpers import hf_logits, kv_cache_logits, pipeline_logits


def make_inputs(seed: int = 0) -> list[dict]:
    return vlm_helpers.make_inputs("qwen2.5-vl", seed)


def _layouts_body(rank, world_size, hf_dir, cases, refs):
    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.platform import init_model_parallel
    import json

    spec = spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    diffs = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_model_parallel(tp=tp, pp=pp)
        model = build_vlm(spec).eval()
        fill_from_hf(model, HFCheckpoint(hf_dir))
        for i, case in enumerate(cases):
            out = pipeline_logits(model, case)
            if out is not None:
                diffs[f"tp{tp}pp{pp}_case{i}"] = (out - refs[i]).abs().max().item()
            if pp == 1 and tp == 2 and i == 2:
                diffs["tp2_kv_cache_case2"] = (kv_cache_logits(model, case) - refs[i][:, -3:]).abs().max().item()
    frozen = build_vlm(spec, freeze_vision=True)
    if frozen.vision is not None:
        assert not any(p.requires_grad for p in frozen.vision.parameters())
        assert all(p.requires_grad for p in frozen.language_model.parameters())
    return diffs


def test_logits_match_hf_at_tp1_tp2_pp2(tmp_path):
    from multirank import run_multirank

    hf = make_hf_model(str(tmp_path / "hf"))
    cases = make_inputs()
    refs = [hf_logits(hf, c) for c in cases]
    results = run_multirank(_layouts_body, world_size=2, args=(str(tmp_path / "hf"), cases, refs))
    diffs = {k: v for r in results for k, v in r.items()}
    assert len(diffs) == 10, diffs
    assert max(diffs.values()) < 1e-4, diffs


def test_rope_index_matches_hf():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models import get_rope_index

    hf = Qwen2_5_VLForConditionalGeneration(tiny_hf_config())
    for case in make_inputs(seed=3)[1:]:
        ids = case["input_ids"]
        ref, ref_delta = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == IMG).int(),
                                                 image_grid_thw=case["image_grid_thw"])
        ours, delta = get_rope_index(ids, case["image_grid_thw"], image_token_id=IMG, vision_start_token_id=VSTART)
        assert torch.equal(ours, ref) and torch.equal(delta.flatten(), ref_delta.flatten())


def test_rope_index_left_padding_and_text_only():
    from megatron_papo.models import get_rope_index

    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(ids, None, mask, image_token_id=IMG, vision_start_token_id=VSTART)
    assert pos[:, 0].tolist() == [[1, 1, 0, 1, 2]] * 3
    assert pos[:, 1].tolist() == [[0, 1, 2, 3, 4]] * 3
    assert delta.flatten().tolist() == [0, 0]


def test_presets_have_published_dimensions():
    from megatron_papo.models import PRESETS

    want = {"qwen2.5-vl-3b": (2048, 36, 16, 2, 11008, True), "qwen2.5-vl-7b": (3584, 28, 28, 4, 18944, False),
            "qwen2.5-vl-32b": (5120, 64, 40, 8, 27648, False), "qwen2.5-vl-72b": (8192, 80, 64, 8, 29568, False)}
    for name, (h, layers, heads, kv, inter, tied) in want.items():
        s = PRESETS[name]
        s.validate()
        assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.intermediate_size,
                s.tie_word_embeddings) == (h, layers, heads, kv, inter, tied)
        assert s.vision.out_hidden_size == h and s.vision.depth == 32 and s.vision.hidden_size == 1280
    PRESETS["tiny"].validate()


def test_fp8_and_te_requests_fail_clearly_without_support():
    from megatron_papo.models.common.specs import check_transformer_impl
    from megatron_papo.platform import fp8_available

    check_transformer_impl("local", None)
    with pytest.raises(ValueError, match="transformer_impl=transformer_engine"):
        check_transformer_impl("local", "e4m3")
    with pytest.raises(ValueError, match="unknown"):
        check_transformer_impl("te", None)
    if not fp8_available()[0]:
        with pytest.raises(ValueError, match="model.fp8"):
            check_transformer_impl("transformer_engine", "hybrid")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            check_transformer_impl("transformer_engine", None)


def test_old_module_paths_reexport_the_new_homes():
    """Scripts written before the family folders keep importing the same objects."""
    import megatron_papo.models as models
    from megatron_papo.models import attention, configs, presets, rope_index, specs, vision, vlm
    from megatron_papo.models.common import attention as common_attention, rope_index as common_rope
    from megatron_papo.models.common import specs as common_specs
    from megatron_papo.models.qwen2_5_vl import spec as qwen25_spec, vision as qwen25_vision

    assert vlm.Qwen25VLModel is models.Qwen25VLModel and vlm.build_vlm is models.build_vlm
    assert vlm.padded_vocab_size is models.padded_vocab_size and presets.VLMSpec is qwen25_spec.VLMSpec
    assert presets.PRESETS is qwen25_spec.PRESETS and presets.get_preset is qwen25_spec.get_preset
    assert vision.VisionTower is qwen25_vision.VisionTower and specs.local_layer_spec is common_specs.local_layer_spec
    assert rope_index.get_rope_index is common_rope.get_rope_index
    assert configs.check_tp_divisibility is models.check_tp_divisibility
    assert attention.SDPAttention is common_attention.SDPAttention
