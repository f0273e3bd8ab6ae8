"""Qwen3-VL conversion: HF -> megatron (written at PP=2, read back at TP=1 and TP=2) -> HF is bit-identical in
the published layout and loads in transformers; verify_conversion agrees at TP=2; the family is recorded and detected;
bad checkpoints fail with one line naming the mismatch."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_tiny import make_qwen3_model, tiny_qwen3_config
from test_qwen3_vl import make_inputs
from vlm_helpers import assert_round_trip, assert_verify_conversion_passes, load_tool


def test_round_trip_pp2_bit_identical_and_verified(tmp_path, capsys):
    from transformers import Qwen3VLForConditionalGeneration

    from megatron_papo.convert import mcore_to_hf, read_checkpoint_meta

    hf_dir, mc_dir, back = str(tmp_path / "hf"), str(tmp_path / "mc"), str(tmp_path / "back")
    hf = make_qwen3_model(hf_dir, seed=1)
    assert load_tool("convert_checkpoint").main(["hf-to-mcore", "--hf", hf_dir, "--out", mc_dir, "--tp", "1",
                                             "--pp", "2"]) == 0
    assert json.load(open(os.path.join(mc_dir, "megatron_papo_model.json")))["family"] == "qwen3-vl"
    assert type(read_checkpoint_meta(mc_dir)[0]).__name__ == "Qwen3VLSpec"
    mcore_to_hf(mc_dir, back)  # loads the PP2 checkpoint at TP1 x PP1

    # the raw files: the published names (model.visual.*, model.language_model.*), not the normalised ones
    src, dst = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert_round_trip(src, dst, Qwen3VLForConditionalGeneration, back, hf, make_inputs()[2])
    assert_verify_conversion_passes(hf_dir, mc_dir, capsys)


def test_name_map_covers_every_hf_tensor_once():
    from transformers import Qwen3VLForConditionalGeneration

    from megatron_papo.convert.mapping import normalise_hf_name
    from megatron_papo.models import spec_from_hf_config
    from megatron_papo.models.qwen3_vl.mapping import expected_hf_shapes, hf_export_name, name_map

    for tied in (False, True):
        cfg = tiny_qwen3_config(tied)
        hf = Qwen3VLForConditionalGeneration(cfg)
        spec = spec_from_hf_config(cfg.to_dict())
        raw = {n: tuple(p.shape) for n, p in hf.state_dict().items() if not (tied and n == "lm_head.weight")}
        hf_names = {normalise_hf_name(n): s for n, s in raw.items()}
        mapped = [n for e in name_map(spec) for n in e.hf]
        assert sorted(mapped) == sorted(hf_names)
        assert sorted(hf_export_name(n) for n in mapped) == sorted(raw)
        shapes = expected_hf_shapes(spec)
        assert all(shapes[n] == s for n, s in hf_names.items())


def test_missing_deepstack_merger_is_named(tmp_path):
    from megatron_papo.convert import hf_to_mcore

    d = str(tmp_path / "hf")
    make_qwen3_model(d)
    path = os.path.join(d, "model.safetensors")
    tensors = {k: v for k, v in load_file(path).items() if ".deepstack_merger_list.1." not in k}
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^\S+: tensor 'visual\.deepstack_merger_list\.1\.\S+' is missing") as e:
        hf_to_mcore(d, str(tmp_path / "out"))
    assert "\n" not in str(e.value)


def test_qwen25_weights_under_qwen3_preset_are_named(tmp_path):
    from megatron_papo.config import load_config
    from megatron_papo.convert import write_checkpoint_meta
    from megatron_papo.models import get_preset
    from megatron_papo.training.trainer import model_spec

    old = str(tmp_path / "qwen25")
    write_checkpoint_meta(old, get_preset("tiny"), torch.float32)
    meta = json.load(open(os.path.join(old, "megatron_papo_model.json")))
    meta.pop("family")  # a checkpoint written before families were recorded is Qwen2.5-VL
    json.dump(meta, open(os.path.join(old, "megatron_papo_model.json"), "w"))
    cfg = load_config(None, ["model.preset=qwen3-vl-tiny", f"model.load={old}"])
    tok = types.SimpleNamespace(vocab_size=256, image_token_id=250, vision_start_id=249)
    with pytest.raises(ValueError, match=r"qwen3-vl model but the checkpoint at model.load holds qwen2.5-vl") as e:
        model_spec(cfg, tok)
    assert "\n" not in str(e.value)
    # Qwen2.5-VL safetensors under a Qwen3-VL config.json: the first tensor that differs is named
    from megatron_papo.convert import hf_to_mcore
    from hf_tiny import make_hf_model

    d = str(tmp_path / "hf25")
    make_hf_model(d)
    json.dump(tiny_qwen3_config().to_dict(), open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"tensor 'visual\.patch_embed\.proj\.weight' has shape "
                                         r"\[32, 3, 2, 14, 14\] but config.json implies \[32, 3, 2, 16, 16\]"):
        hf_to_mcore(d, str(tmp_path / "out"))


def test_hf_config_written_for_a_trained_model_reads_back():
    """mcore-to-hf of a model that never came from Hugging Face writes this config: both readers agree on it."""
    from transformers import Qwen3VLConfig

    from megatron_papo.models import get_preset, spec_from_hf_config
    from megatron_papo.models.qwen3_vl.spec import hf_config_from_spec

    spec = get_preset("qwen3-vl-tiny")
    cfg = hf_config_from_spec(spec, "float32")
    assert spec_from_hf_config(cfg, name=spec.name) == spec
    hf = Qwen3VLConfig(**cfg)
    t, v = hf.text_config, hf.vision_config
    assert (t.head_dim, t.num_hidden_layers, t.rope_parameters["mrope_section"], t.rope_parameters["rope_theta"]) == \
        (16, 4, [2, 3, 3], 10000.0)
    assert (v.num_position_embeddings, list(v.deepstack_visual_indexes), v.patch_size) == (64, [0, 1, 2], 16)
