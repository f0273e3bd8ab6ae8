"""Hugging Face checkpoint directories: config.json, single or sharded safetensors, read lazily by name."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_papo.convert.mapping import normalise_hf_name
from megatron_papo.models.qwen2_5_vl.spec import VLMSpec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: --hf must be a Hugging Face model directory with config.json")
    with open(path) as f:
        return json.load(f)


class HFCheckpoint:
    """Tensor name -> file map of a safetensors checkpoint; tensors are read one at a time on demand."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                files = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            files = None
        else:
            raise FileNotFoundError(f"{hf_dir} holds neither {INDEX} nor {SINGLE}")
        if files is None:
            with safe_open(os.path.join(hf_dir, SINGLE), "pt") as f:
                files = {k: SINGLE for k in f.keys()}
        for fname in sorted(set(files.values())):
            if not os.path.isfile(os.path.join(hf_dir, fname)):
                raise FileNotFoundError(f"safetensors file {os.path.join(hf_dir, fname)} listed in {INDEX} is missing")
        self._raw = {normalise_hf_name(k): k for k in files}
        self._file = {normalise_hf_name(k): v for k, v in files.items()}

    def names(self) -> list[str]:
        return list(self._file)

    def _open(self, name: str):
        if name not in self._file:
            raise KeyError(f"tensor '{name}' is not in the checkpoint at {self.dir}")
        return safe_open(os.path.join(self.dir, self._file[name]), "pt")

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as f:
            return tuple(f.get_slice(self._raw[name]).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with self._open(name) as f:
            return f.get_tensor(self._raw[name])


def open_hf_checkpoint(hf_dir: str) -> tuple[dict, VLMSpec, HFCheckpoint]:
    """Read and check a Qwen2.5-VL or Qwen3-VL checkpoint (the family from config.json): its config, the spec, and
    every tensor's presence and shape."""
    from megatron_papo.models.registry import family_of_hf_config

    cfg = read_hf_config(hf_dir)
    family = family_of_hf_config(cfg)
    spec = family.spec_from_hf_config(cfg, name=os.path.basename(os.path.normpath(hf_dir)))
    ckpt = HFCheckpoint(hf_dir)
    mapping = family.mapping()
    expected = mapping.expected_hf_shapes(spec)
    for entry in mapping.name_map(spec):
        for name in entry.hf:
            if name not in ckpt._file:
                raise ValueError(f"{hf_dir}: tensor '{name}' is missing from the checkpoint")
            shape = ckpt.shape(name)
            if shape != expected[name]:
                raise ValueError(f"{hf_dir}: tensor '{name}' has shape {list(shape)} but config.json implies "
                                 f"{list(expected[name])}")
    return cfg, spec, ckpt


def write_hf_checkpoint(out_dir: str, tensors: dict[str, torch.Tensor], config: dict,
                        max_shard_bytes: int = 4 * 1024 ** 3) -> None:
    """config.json + safetensors (sharded with an index when larger than max_shard_bytes)."""
    os.makedirs(out_dir, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
