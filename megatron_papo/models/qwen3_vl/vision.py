"""Qwen3-VL vision tower on megatron-core layers: patch embedding (with bias), learned position embeddings
resampled to each image's grid, 2D rotary, full attention within each image, the merger and the DeepStack mergers.

All patches of a batch form one sequence [P, 1, hv] (megatron's [s, b, h] with b = 1); images do not attend to
each other (a block-diagonal boolean mask, True = masked out). Patches arrive in merge-block order (m x m
neighbouring patches consecutive), as the image processor emits them.

Legend: P patches, hv vision width, hd vision head dim, m spatial merge size, N = P / m^2 merged tokens,
h LM width, K deepstack mergers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_papo.models.qwen3_vl.spec import Qwen3VisionSpec
from megatron_papo.models.vision import block_diagonal_mask, vision_position_ids, vision_sharded_state_dict


def _axis_taps(index: torch.Tensor, size: int, side: int):
    """Bilinear (align_corners=True) taps [n, 2] into a ``side``-long table for positions 0..size-1, and weights."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    taps = floor.long()[:, None] + torch.arange(2)
    weights = (1 - (src[:, None] - taps.float()).abs()).clamp(min=0)
    return taps.clamp(0, side - 1), weights


def interpolation_taps(grid_thw: torch.Tensor, side: int, merge: int):
    """Per patch, in merge-block order: 4 indices into the flat side x side table and their weights [P, 4]."""
    idx, wts = [], []
    for t, h, w in grid_thw.tolist():
        (ht, hw), (wt, ww) = _axis_taps(torch.arange(h), h, side), _axis_taps(torch.arange(w), w, side)
        index = (ht[:, None, :, None] * side + wt[None, :, None, :]).reshape(h, w, 4)  # [h, w, 4]
        weight = (hw[:, None, :, None] * ww[None, :, None, :]).reshape(h, w, 4)
        block = lambda x: x.reshape(h // merge, merge, w // merge, merge, 4).transpose(1, 2).reshape(-1, 4)
        idx.append(block(index).repeat(t, 1))
        wts.append(block(weight).repeat(t, 1))
    return torch.cat(idx), torch.cat(wts)


class PatchMerger(MegatronModule):
    """LayerNorm on each patch, m x m neighbouring patches concatenated, then a GELU MLP to the LM width."""

    def __init__(self, config: TransformerConfig, v: Qwen3VisionSpec, norm_width: int):
        super().__init__(config=config)
        self.width = v.hidden_size * v.spatial_merge_size ** 2
        self.norm = torch.nn.LayerNorm(norm_width, eps=v.layernorm_eps, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.width, self.width, config=config, init_method=config.init_method, bias=True, gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.width, v.out_hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).reshape(-1, 1, self.width)  # [N, 1, m^2*hv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.linear_fc1(self.normed(x))  # [N, 1, m^2*hv/tp]
        y, _ = self.linear_fc2(F.gelu(y))  # [N, 1, h]
        return y.squeeze(1)


class PostShuffleMerger(PatchMerger):
    """The DeepStack mergers: the LayerNorm runs over the concatenated m x m patches."""

    def __init__(self, config: TransformerConfig, v: Qwen3VisionSpec):
        super().__init__(config, v, v.hidden_size * v.spatial_merge_size ** 2)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.reshape(-1, 1, self.width))


class Qwen3VisionTower(MegatronModule):
    def __init__(self, config: TransformerConfig, v: Qwen3VisionSpec, layer_spec: ModuleSpec):
        super().__init__(config=config)
        self.v = v
        # Conv3d with kernel == stride is a linear map of each flattened (c, t, p, p) patch.
        self.patch_embed = torch.nn.Linear(v.patch_dim, v.hidden_size, bias=True, dtype=config.params_dtype)
        config.init_method(self.patch_embed.weight)
        self.pos_embed = torch.nn.Embedding(v.num_position_embeddings, v.hidden_size, dtype=config.params_dtype)
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=i + 1) for i in range(v.depth))
        self.merger = PatchMerger(config, v, v.hidden_size)
        self.deepstack_mergers = torch.nn.ModuleList(PostShuffleMerger(config, v) for _ in v.deepstack_visual_indexes)
        self.deepstack_of_block = {b: k for k, b in enumerate(v.deepstack_visual_indexes)}
        rot = v.hidden_size // v.num_heads // 2  # rotary half-dim per axis pair
        inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        parts = [("patch_embed", self.patch_embed), ("pos_embed", self.pos_embed), ("merger", self.merger)]
        parts += [(f"deepstack_mergers.{k}", m) for k, m in enumerate(self.deepstack_mergers)]
        return vision_sharded_state_dict(self.layers, parts, prefix, sharded_offsets, metadata)

    def _rotary(self, grid_thw: torch.Tensor, device) -> torch.Tensor:
        pos = vision_position_ids(grid_thw, self.v.spatial_merge_size).to(device)  # [P, 2]
        freqs = pos[..., None].float() * self.inv_freq.to(device)  # [P, 2, hd/4]
        half = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [P, hd/2]: rows then cols
        return torch.cat([half, half], dim=-1)[:, None, None, :]  # [P, 1, 1, hd]

    def _positions(self, grid_thw: torch.Tensor, device) -> torch.Tensor:
        idx, wts = interpolation_taps(grid_thw, self.v.num_grid_per_side, self.v.spatial_merge_size)
        table = self.pos_embed(idx.to(device))  # [P, 4, hv]
        return (table * wts.to(device, table.dtype)[..., None]).sum(1)  # [P, hv]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """pixel_values [P, c*t*p*p], grid_thw [n, 3] -> (merged features [N, h], K deepstack features [N, h])."""
        dev = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [P, hv]
        x = (x + self._positions(grid_thw, dev).to(x.dtype))[:, None, :]  # [P, 1, hv]
        rot = self._rotary(grid_thw, dev)
        frames = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        mask = block_diagonal_mask(frames, dev) if len(frames) > 1 else None  # [1, 1, P, P]
        deepstack = [None] * len(self.deepstack_mergers)
        for i, layer in enumerate(self.layers):
            x, _ = layer(hidden_states=x, attention_mask=mask, rotary_pos_emb=rot)
            if i in self.deepstack_of_block:
                k = self.deepstack_of_block[i]
                deepstack[k] = self.deepstack_mergers[k](x.squeeze(1))
        return self.merger(x.squeeze(1)), deepstack
