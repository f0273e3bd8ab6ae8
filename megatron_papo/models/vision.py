"""Qwen2.5-VL vision tower on megatron-core layers: 3D patch embedding, 2D rotary, window attention, merger.

Patches of all images in a batch form one sequence [P, 1, hv] (megatron's [s, b, h] with b = 1). Window
attention is expressed as block-diagonal boolean masks (True = masked out) for the SDPA core attention: one
mask for the window layers, one per-image mask for the full-attention layers. Tokens are reordered so each
window is contiguous (HF `get_window_index`), then restored after the merger.

Legend: P patches, hv vision width, hd vision head dim, m spatial merge size, n images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_papo.models.presets import VisionSpec


def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch [P, 2], patches ordered block-major over m x m merge blocks."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


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


def block_diagonal_mask(lengths: list[int], device) -> torch.Tensor:
    """[1, 1, P, P] bool, True where attention crosses a block boundary (megatron: True = masked)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))
    return (seg[:, None] != seg[None, :])[None, None]


class PatchMerger(MegatronModule):
    """RMSNorm, then m x m neighbouring patches concatenated and projected by a GELU MLP to the LM width."""

    def __init__(self, config: TransformerConfig, v: VisionSpec):
        super().__init__(config=config)
        self.width = v.hidden_size * v.spatial_merge_size ** 2
        self.norm = torch.nn.RMSNorm(v.hidden_size, eps=v.rms_eps, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.width, self.width, config=config, init_method=config.init_method, bias=True,
            gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.width, v.out_hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).reshape(-1, 1, self.width)  # [P/m^2, 1, m^2*hv]
        x, _ = self.linear_fc1(x)  # [P/m^2, 1, m^2*hv/tp]
        x, _ = self.linear_fc2(F.gelu(x))  # [P/m^2, 1, h]
        return x.squeeze(1)


class VisionTower(MegatronModule):
    def __init__(self, config: TransformerConfig, v: VisionSpec, layer_spec: ModuleSpec):
        super().__init__(config=config)
        self.v = v
        # Conv3d with kernel == stride is a linear map of each flattened (c, t, p, p) patch.
        self.patch_embed = torch.nn.Linear(v.patch_dim, v.hidden_size, bias=False, dtype=config.params_dtype)
        config.init_method(self.patch_embed.weight)
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=i + 1) for i in range(v.depth))
        self.merger = PatchMerger(config, v)
        rot = v.hidden_size // v.num_heads // 2  # rotary half-dim per axis pair
        inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        parts = [("patch_embed", self.patch_embed), ("merger", self.merger)]
        return vision_sharded_state_dict(self.layers, parts, prefix, sharded_offsets, metadata)

    def _rotary(self, grid_thw: torch.Tensor, device) -> torch.Tensor:
        pos = vision_position_ids(grid_thw, self.v.spatial_merge_size).to(device)  # [P, 2]
        freqs = pos[..., None].float() * self.inv_freq.to(device)  # [P, 2, hd/4]
        half = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [P, hd/2]: rows then cols
        return torch.cat([half, half], dim=-1)  # [P, hd]

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
        frames = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        full_mask = block_diagonal_mask(frames, dev)
        win_mask = block_diagonal_mask(win_lengths, dev)
        for i, layer in enumerate(self.layers):
            mask = full_mask if i in v.fullatt_block_indexes else win_mask
            x, _ = layer(hidden_states=x, attention_mask=mask, rotary_pos_emb=rot)
        merged = self.merger(x.squeeze(1))  # [P/m^2, h] in window order
        return merged[torch.argsort(order)]


def vision_sharded_state_dict(layers, parts: list, prefix: str, sharded_offsets, metadata) -> dict:
    """A vision tower's sharded state dict: its ``layers`` are a plain ModuleList, so each TransformerLayer gives
    its own (TP-aware) one; the other ``parts`` ((name, module) pairs) go through megatron's default."""
    out = {}
    for i, layer in enumerate(layers):
        out.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
    tp_group = parallel_state.get_tensor_model_parallel_group()  # None would mark every TP rank replica 0
    for name, module in parts:
        out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                              tp_group=tp_group))
    return out
