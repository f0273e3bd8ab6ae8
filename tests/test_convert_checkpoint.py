"""HF -> megatron (written at TP=2 x PP=2) -> HF: bit-identical tensors, loadable by transformers, and the
dist checkpoint loads at other layouts with logits equal to transformers'. Bad inputs fail naming the cause."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from hf_tiny import make_hf_model, tiny_hf_config
from test_model_vlm import make_inputs
from vlm_helpers import assert_round_trip, assert_verify_conversion_passes, load_tool


def _tensors(d: str) -> dict:
    from megatron_papo.convert.hf_io import HFCheckpoint

    ckpt = HFCheckpoint(d)
    return {n: ckpt.get(n) for n in ckpt.names()}


def test_round_trip_tp2pp2_bit_identical_and_loads_elsewhere(tmp_path, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.convert import hf_to_mcore, mcore_to_hf

    hf_dir, mc_dir, back = str(tmp_path / "hf"), str(tmp_path / "mc"), str(tmp_path / "back")
    hf = make_hf_model(hf_dir, seed=1)
    assert load_tool("convert_checkpoint").main(["hf-to-mcore", "--hf", hf_dir, "--out", mc_dir, "--tp", "2",
                                             "--pp", "2"]) == 0
    mcore_to_hf(mc_dir, back)  # loads the TP2 x PP2 checkpoint at TP1 x PP1

    assert_round_trip(_tensors(hf_dir), _tensors(back), Qwen2_5_VLForConditionalGeneration, back, hf,
                      make_inputs()[2])
    assert_verify_conversion_passes(hf_dir, mc_dir, capsys)


def _write_hf(tmp_path, name="hf"):
    d = str(tmp_path / name)
    make_hf_model(d)
    return d


def test_other_architecture_is_named(tmp_path):
    from megatron_papo.convert import hf_to_mcore

    d = _write_hf(tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="llama"):
        hf_to_mcore(d, str(tmp_path / "out"))


def test_mismatched_shape_is_named(tmp_path):
    from megatron_papo.convert import hf_to_mcore

    d = _write_hf(tmp_path)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    bad = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight"))
    tensors[bad] = tensors[bad][:-1].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*shape"):
        hf_to_mcore(d, str(tmp_path / "out"))


def test_missing_files_are_named(tmp_path):
    from megatron_papo.convert import hf_to_mcore, load_vlm_checkpoint, mcore_to_hf

    d = _write_hf(tmp_path)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, os.path.join(d, "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
                            for i, k in enumerate(names)}}
    json.dump(index, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        hf_to_mcore(d, str(tmp_path / "out"))
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_to_mcore(d, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="megatron_papo_model.json"):
        mcore_to_hf(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_name_map_covers_every_hf_tensor_once():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.convert import name_map
    from megatron_papo.convert.mapping import normalise_hf_name
    from megatron_papo.models.qwen2_5_vl.mapping import expected_hf_shapes
    from megatron_papo.models import spec_from_hf_config

    for tied in (False, True):
        cfg = tiny_hf_config(tied)
        hf = Qwen2_5_VLForConditionalGeneration(cfg)
        spec = spec_from_hf_config(cfg.to_dict())
        hf_names = {normalise_hf_name(n): tuple(p.shape) for n, p in hf.state_dict().items()}
        if tied:
            hf_names.pop("lm_head.weight")
        mapped = [n for e in name_map(spec) for n in e.hf]
        assert sorted(mapped) == sorted(hf_names)
        shapes = expected_hf_shapes(spec)
        assert all(shapes[n] == s for n, s in hf_names.items())
