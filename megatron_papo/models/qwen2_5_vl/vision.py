"""Qwen2.5-VL vision tower on megatron-core layers: 3D patch embedding, 2D rotary, window attention, merger
(the shared skeleton and pieces: ``models.common.vision``).

Window attention is expressed as block-diagonal boolean masks (True = masked out) for the SDPA core attention:
one mask for the window layers, one per-image mask for the full-attention layers. Tokens are reordered so each
window is contiguous (HF `get_window_index`), then restored after the merger.

Legend: P patches, hv vision width, hd vision head dim, m spatial merge size, n images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_papo.models.common.vision import (MergerMLP, VisionTowerBase, block_diagonal_mask, frame_lengths,
                                                vision_position_ids)
from megatron_papo.models.qwen2_5_vl.spec import VisionSpec

__all__ = ["PatchMerger", "VisionTower", "block_diagonal_mask", "vision_position_ids", "window_index"]


def window_index(grid_thw: torch.Tensor, merge: int, window_px: int, patch: int):
    """(order [P/m^2] of merged tokens grouping each window contiguously, window lengths in patches)."""
    win = window_px // merge // patch
    order, lengths, base = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = (-gh) % win, (-gw) % win
        idx = F.pad(idx, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        idx = idx.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        counts = (idx >= 0).sum(-1).flatten()
        flat = idx.flatten()
        order.append(flat[flat >= 0] + base)
        lengths.extend(c * merge * merge for c in counts.tolist() if c > 0)
        base += t * gh * gw
    return torch.cat(order), lengths


class PatchMerger(MergerMLP):
    """RMSNorm on each patch, then the shared merger MLP."""

    def __init__(self, config: TransformerConfig, v: VisionSpec):
        super().__init__(config, v, torch.nn.RMSNorm(v.hidden_size, eps=v.rms_eps, dtype=config.params_dtype))


class VisionTower(VisionTowerBase):
    def _heads(self, config: TransformerConfig) -> None:
        self.merger = PatchMerger(config, self.v)

    def _state_parts(self) -> list:
        return [("patch_embed", self.patch_embed), ("merger", self.merger)]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [P, c*t*p*p], grid_thw [n, 3] -> merged image features [P/m^2, h] in input order."""
        v, unit = self.v, self.v.spatial_merge_size ** 2
        dev = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [P, hv]
        P = x.shape[0]
        order, win_lengths = window_index(grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
        order = order.to(dev)
        x = x.reshape(P // unit, unit, -1)[order].reshape(P, 1, -1)  # [P, 1, hv] windows contiguous
        rot = self._rotary(grid_thw, dev).reshape(P // unit, unit, -1)[order].reshape(P, 1, 1, -1)
        full_mask = block_diagonal_mask(frame_lengths(grid_thw), dev)
        win_mask = block_diagonal_mask(win_lengths, dev)
        for i, layer in enumerate(self.layers):
            mask = full_mask if i in v.fullatt_block_indexes else win_mask
            x, _ = layer(hidden_states=x, attention_mask=mask, rotary_pos_emb=rot)
        merged = self.merger(x.squeeze(1))  # [P/m^2, h] in window order
        return merged[torch.argsort(order)]
