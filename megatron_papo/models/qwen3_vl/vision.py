"""Qwen3-VL vision tower on megatron-core layers: patch embedding (with bias), learned position embeddings
resampled to each image's grid, 2D rotary, full attention within each image, the merger and the DeepStack mergers.

The skeleton, rotary table, masks and merger MLP are the shared ones (``models.common.vision``). Images do not
attend to each other (a block-diagonal boolean mask, True = masked out).

Legend: P patches, hv vision width, hd vision head dim, m spatial merge size, N = P / m^2 merged tokens,
h LM width, K deepstack mergers.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

from megatron_papo.models.common.vision import MergerMLP, VisionTowerBase, block_diagonal_mask, frame_lengths
from megatron_papo.models.qwen3_vl.spec import Qwen3VisionSpec


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


class PatchMerger(MergerMLP):
    """LayerNorm on each patch (``norm_width`` hv), then the shared merger MLP."""

    def __init__(self, config: TransformerConfig, v: Qwen3VisionSpec, norm_width: int):
        super().__init__(config, v, torch.nn.LayerNorm(norm_width, eps=v.layernorm_eps, dtype=config.params_dtype))


class PostShuffleMerger(PatchMerger):
    """The DeepStack mergers: the LayerNorm runs over the concatenated m x m patches."""

    def __init__(self, config: TransformerConfig, v: Qwen3VisionSpec):
        super().__init__(config, v, v.hidden_size * v.spatial_merge_size ** 2)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.reshape(-1, 1, self.width))


class Qwen3VisionTower(VisionTowerBase):
    patch_bias = True

    def _embeddings(self, config: TransformerConfig) -> None:
        v = self.v
        self.pos_embed = torch.nn.Embedding(v.num_position_embeddings, v.hidden_size, dtype=config.params_dtype)

    def _heads(self, config: TransformerConfig) -> None:
        v = self.v
        self.merger = PatchMerger(config, v, v.hidden_size)
        self.deepstack_mergers = torch.nn.ModuleList(PostShuffleMerger(config, v) for _ in v.deepstack_visual_indexes)
        self.deepstack_of_block = {b: k for k, b in enumerate(v.deepstack_visual_indexes)}

    def _state_parts(self) -> list:
        parts = [("patch_embed", self.patch_embed), ("pos_embed", self.pos_embed), ("merger", self.merger)]
        return parts + [(f"deepstack_mergers.{k}", m) for k, m in enumerate(self.deepstack_mergers)]

    def _positions(self, grid_thw: torch.Tensor, device) -> torch.Tensor:
        idx, wts = interpolation_taps(grid_thw, self.v.num_grid_per_side, self.v.spatial_merge_size)
        table = self.pos_embed(idx.to(device))  # [P, 4, hv]
        return (table * wts.to(device, table.dtype)[..., None]).sum(1)  # [P, hv]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """pixel_values [P, c*t*p*p], grid_thw [n, 3] -> (merged features [N, h], K deepstack features [N, h])."""
        dev = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [P, hv]
        x = (x + self._positions(grid_thw, dev).to(x.dtype))[:, None, :]  # [P, 1, hv]
        rot = self._rotary(grid_thw, dev)[:, None, None, :]  # [P, 1, 1, hd]
        frames = frame_lengths(grid_thw)
        mask = block_diagonal_mask(frames, dev) if len(frames) > 1 else None  # [1, 1, P, P]
        deepstack = [None] * len(self.deepstack_mergers)
        for i, layer in enumerate(self.layers):
            x, _ = layer(hidden_states=x, attention_mask=mask, rotary_pos_emb=rot)
            if i in self.deepstack_of_block:
                k = self.deepstack_of_block[i]
                deepstack[k] = self.deepstack_mergers[k](x.squeeze(1))
        return self.merger(x.squeeze(1)), deepstack
