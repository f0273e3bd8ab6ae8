"""Megatron dist checkpoints of the VLM: HF -> mcore, mcore -> HF, and loading at any TP x PP.

A converted directory holds `megatron_papo_model.json` (model family, architecture, dtype, the HF config it came
from; a file without `family` is a Qwen2.5-VL checkpoint from before there were two families) and
`model/` (megatron.core.dist_checkpointing files of the model's sharded_state_dict, loadable at any layout).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_papo.convert.hf_io import HFCheckpoint, open_hf_checkpoint, write_hf_checkpoint
from megatron_papo.convert.launch import run_ranks
from megatron_papo.convert.mapping import tp_shard, to_hf, to_mcore
from megatron_papo.models.common.vlm import VLMBase
from megatron_papo.models.qwen2_5_vl.spec import VLMSpec
from megatron_papo.models.registry import build_vlm, check_tp_divisibility, family_of_spec, get_family

META = "megatron_papo_model.json"
MODEL_DIR = "model"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_checkpoint_meta(ckpt_dir: str, spec: VLMSpec, params_dtype: torch.dtype, hf_config: dict | None = None):
    """Describe the model stored in ckpt_dir (the trainer calls this next to its own dist checkpoints)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    dtype = next(k for k, v in _DTYPES.items() if v == params_dtype)
    with open(os.path.join(ckpt_dir, META), "w") as f:
        json.dump({"family": family_of_spec(spec).name, "spec": dataclasses.asdict(spec), "params_dtype": dtype,
                   "hf_config": hf_config}, f, indent=2)


def read_checkpoint_meta(ckpt_dir: str) -> tuple[VLMSpec, torch.dtype, dict | None]:
    path = os.path.join(ckpt_dir, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} is not a megatron_papo checkpoint "
                                "(make one with tools/convert_checkpoint.py hf-to-mcore)")
    with open(path) as f:
        meta = json.load(f)
    spec = get_family(meta.get("family")).spec_from_dict(meta["spec"])
    return spec, _DTYPES[meta["params_dtype"]], meta.get("hf_config")


def _hf_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"config.json dtype {name!r} is not supported; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _global_name(model: VLMBase, local: str) -> str:
    """Local parameter name -> full-model name (language layers renumbered from this stage's offset)."""
    offset = get_transformer_layer_offset(model.language_model.config)
    m = re.match(r"^(language_model\.decoder\.layers\.)(\d+)(\..*)$", local)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}" if m else local


@torch.no_grad()
def fill_from_hf(model: VLMBase, ckpt: HFCheckpoint) -> None:
    """Copy this rank's shard of every parameter from an HF checkpoint (through the name map)."""
    spec = model.spec
    entries = {e.mcore: e for e in family_of_spec(spec).mapping().name_map(spec)}
    tp_rank, tp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    for local, param in model.named_parameters():
        name = _global_name(model, local)
        if name == "language_model.output_layer.weight" and spec.tie_word_embeddings:
            name = "language_model.embedding.word_embeddings.weight"  # tied: last stage's copy of the embedding
        entry = entries[name]
        shard = tp_shard(entry, to_mcore(entry, [ckpt.get(n) for n in entry.hf], spec), tp_rank, tp)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: converted shard {list(shard.shape)} != parameter {list(param.shape)}")
        param.copy_(shard)


def load_vlm_checkpoint(model: VLMBase, ckpt_dir: str) -> None:
    """Load a converted (or trainer-saved) dist checkpoint into this rank's model, at any TP x PP."""
    path = os.path.join(ckpt_dir, MODEL_DIR)
    if not os.path.isdir(path) and os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        path = ckpt_dir            # a training checkpoint: the model's tensors sit beside optimizer and RNG state
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} holds no megatron dist checkpoint")
    wanted = model.sharded_state_dict()
    state = dist_checkpointing.load(wanted, path)
    # a training checkpoint's common state (step, config, optimizer's plain entries) comes back too: drop it
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)


def load_vlm(ckpt_dir: str, **build_kwargs) -> VLMBase:
    """build_vlm from a checkpoint's own architecture and dtype, then load its weights."""
    spec, dtype, _ = read_checkpoint_meta(ckpt_dir)
    build_kwargs.setdefault("params_dtype", dtype)
    model = build_vlm(spec, **build_kwargs)
    load_vlm_checkpoint(model, ckpt_dir)
    return model


def _save_rank(hf_dir: str, out_dir: str) -> None:
    spec, dtype, _ = read_checkpoint_meta(out_dir)
    model = build_vlm(spec, params_dtype=dtype)
    fill_from_hf(model, HFCheckpoint(hf_dir))
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(out_dir, MODEL_DIR))


# Tokenizer and processor files travel with the weights, so a converted directory is usable on its own
# (megatron-papo generate / evaluate, transformers' AutoProcessor).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
              "preprocessor_config.json", "generation_config.json")


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer / processor files that exist in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1) -> VLMSpec:
    """Convert an HF Qwen2.5-VL or Qwen3-VL directory (family read from config.json) into a megatron dist
    checkpoint, written by tp*pp ranks."""
    cfg, spec, _ = open_hf_checkpoint(hf_dir)
    check_tp_divisibility(spec, tp)
    if spec.num_layers % pp:
        raise ValueError(f"--pp {pp} does not divide the {spec.num_layers} language layers")
    if os.path.isdir(os.path.join(out_dir, MODEL_DIR)) and os.listdir(os.path.join(out_dir, MODEL_DIR)):
        raise ValueError(f"{os.path.join(out_dir, MODEL_DIR)} already holds files; choose an empty --out")
    os.makedirs(os.path.join(out_dir, MODEL_DIR), exist_ok=True)
    write_checkpoint_meta(out_dir, spec, _hf_dtype(cfg), hf_config=cfg)
    run_ranks(_save_rank, tp=tp, pp=pp, args=(hf_dir, out_dir))
    copy_side_files(hf_dir, out_dir)
    return spec


def hf_config_from_spec(spec, dtype: torch.dtype) -> dict:
    """A transformers config.json of the spec's family for a model that did not come from Hugging Face."""
    return family_of_spec(spec).hf_config_from_spec(spec, next(k for k, val in _DTYPES.items() if val == dtype))


def _export_rank(mcore_dir: str, out_dir: str) -> None:
    spec, dtype, hf_config = read_checkpoint_meta(mcore_dir)
    model = build_vlm(spec, params_dtype=dtype)
    load_vlm_checkpoint(model, mcore_dir)
    params = dict(model.named_parameters())
    family = family_of_spec(spec)
    mapping, tensors = family.mapping(), {}
    for entry in mapping.name_map(spec):
        for name, t in zip(entry.hf, to_hf(entry, params[entry.mcore].detach(), spec)):
            tensors[mapping.hf_export_name(name)] = t.clone()
    dtype_name = next(k for k, val in _DTYPES.items() if val == dtype)
    write_hf_checkpoint(out_dir, tensors, hf_config or family.hf_config_from_spec(spec, dtype_name))


def mcore_to_hf(mcore_dir: str, out_dir: str) -> None:
    """Write a megatron_papo checkpoint as an HF directory (safetensors + config.json) transformers loads."""
    read_checkpoint_meta(mcore_dir)  # fail here, with the message, before spawning
    run_ranks(_export_rank, tp=1, pp=1, args=(mcore_dir, out_dir))
    copy_side_files(mcore_dir, out_dir)
