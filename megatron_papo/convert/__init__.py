"""Hugging Face <-> megatron checkpoint conversion for Qwen2.5-VL and Qwen3-VL (entry kinds and transforms in
mapping.py, each family's name map in models/<family>/mapping.py); the family comes from config.json or the
checkpoint metadata."""

from megatron_papo.convert.checkpoint import (
    fill_from_hf,
    hf_config_from_spec,
    hf_to_mcore,
    load_vlm,
    load_vlm_checkpoint,
    mcore_to_hf,
    read_checkpoint_meta,
    write_checkpoint_meta,
)
from megatron_papo.convert.hf_io import HFCheckpoint, open_hf_checkpoint, read_hf_config, write_hf_checkpoint
from megatron_papo.convert.mapping import Entry, name_map, tp_shard, to_hf, to_mcore

__all__ = [
    "Entry", "HFCheckpoint", "fill_from_hf", "hf_config_from_spec", "hf_to_mcore", "load_vlm",
    "load_vlm_checkpoint", "mcore_to_hf", "name_map", "open_hf_checkpoint", "read_checkpoint_meta",
    "read_hf_config", "to_hf", "to_mcore", "tp_shard", "write_checkpoint_meta", "write_hf_checkpoint",
]
