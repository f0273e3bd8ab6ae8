"""The HF <-> megatron name maps of both families, pinned entry by entry for a few parameters (kind, TP axis,
qkv heads, HF sources) and counted, so a refactor of the maps (the shared language-layer entries in
models/common/mapping.py) cannot change them. Coverage of every HF tensor against transformers is checked in
tests/test_convert_checkpoint.py and tests/test_qwen3_convert.py."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_papo.convert.mapping import Entry

L0 = "language_model.decoder.layers.0"
QWEN25_PINNED = [  # preset "tiny": 4 heads, 2 KV groups, head dim 16; vision 2 heads of 16
    Entry("vision.layers.1.self_attention.linear_qkv.bias", ("visual.blocks.1.attn.qkv.bias",), "qkv", 0, (2, 2, 16)),
    Entry("vision.layers.0.mlp.linear_fc1.bias",
          ("visual.blocks.0.mlp.gate_proj.bias", "visual.blocks.0.mlp.up_proj.bias"), "glu", 0),
    Entry("vision.merger.linear_fc2.weight", ("visual.merger.mlp.2.weight",), tp_axis=1),
    Entry("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0),
    Entry(f"{L0}.input_layernorm.weight", ("model.layers.0.input_layernorm.weight",)),
    Entry(f"{L0}.self_attention.linear_qkv.weight", tuple(f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"),
          "qkv", 0, (4, 2, 16)),
    Entry(f"{L0}.self_attention.linear_qkv.bias", tuple(f"model.layers.0.self_attn.{x}_proj.bias" for x in "qkv"),
          "qkv", 0, (4, 2, 16)),
    Entry(f"{L0}.self_attention.linear_proj.weight", ("model.layers.0.self_attn.o_proj.weight",), tp_axis=1),
    Entry(f"{L0}.pre_mlp_layernorm.weight", ("model.layers.0.post_attention_layernorm.weight",)),
    Entry(f"{L0}.mlp.linear_fc1.weight", ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"),
          "glu", 0),
    Entry(f"{L0}.mlp.linear_fc2.weight", ("model.layers.0.mlp.down_proj.weight",), tp_axis=1),
    Entry("language_model.output_layer.weight", ("lm_head.weight",), "vocab", 0),
]
QWEN3_PINNED = [  # preset "qwen3-vl-tiny": the same language shapes, q/k norms instead of the QKV bias
    Entry("vision.pos_embed.weight", ("visual.pos_embed.weight",)),
    Entry("vision.layers.2.pre_mlp_layernorm.bias", ("visual.blocks.2.norm2.bias",)),
    Entry("vision.deepstack_mergers.2.linear_fc1.bias", ("visual.deepstack_merger_list.2.linear_fc1.bias",),
          tp_axis=0),
    Entry(f"{L0}.self_attention.linear_qkv.weight", tuple(f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"),
          "qkv", 0, (4, 2, 16)),
    Entry(f"{L0}.self_attention.q_layernorm.weight", ("model.layers.0.self_attn.q_norm.weight",)),
    Entry(f"{L0}.self_attention.k_layernorm.weight", ("model.layers.0.self_attn.k_norm.weight",)),
    Entry(f"{L0}.mlp.linear_fc1.weight", ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"),
          "glu", 0),
    Entry("language_model.decoder.layers.3.mlp.linear_fc2.weight", ("model.layers.3.mlp.down_proj.weight",),
          tp_axis=1),
    Entry("language_model.decoder.final_layernorm.weight", ("model.norm.weight",)),
]
# language layer entries in order (suffixes after "language_model.decoder.layers.<i>.")
QWEN25_LAYER = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
                "mlp.linear_fc2.weight"]
QWEN3_LAYER = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.q_layernorm.weight",
               "self_attention.k_layernorm.weight", "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
               "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]


@pytest.mark.parametrize("preset, pinned, layer, count", [("tiny", QWEN25_PINNED, QWEN25_LAYER, 43),
                                                          ("qwen3-vl-tiny", QWEN3_PINNED, QWEN3_LAYER, 98)])
def test_name_map_entries_pinned(preset, pinned, layer, count):
    from megatron_papo.convert import name_map
    from megatron_papo.models import all_presets

    spec = all_presets()[preset]
    entries = name_map(spec)
    by_name = {e.mcore: e for e in entries}
    assert len(by_name) == len(entries) == count
    for e in pinned:
        assert by_name[e.mcore] == e
    prefix = f"language_model.decoder.layers.{spec.num_layers - 1}."
    assert [e.mcore[len(prefix):] for e in entries if e.mcore.startswith(prefix)] == layer
    tied = name_map(dataclasses.replace(spec, tie_word_embeddings=True))
    assert [e.mcore for e in tied] == [e.mcore for e in entries if e.mcore != "language_model.output_layer.weight"]
