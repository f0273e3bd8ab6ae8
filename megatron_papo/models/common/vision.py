"""What both vision towers share: patch positions and their 2D rotary table, block-diagonal attention masks, the
tower's skeleton (patch embedding, the blocks, rotary frequencies) and its sharded state dict, and the merger MLP.

Patches of all images in a batch form one sequence [P, 1, hv] (megatron's [s, b, h] with b = 1), in merge-block
order (m x m neighbouring patches consecutive), as the image processor emits them.

Legend: P patches, hv vision width, hd vision head dim, m spatial merge size, N = P / m^2 merged tokens,
h LM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import sharded_state_dict_default


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


def block_diagonal_mask(lengths: list[int], device) -> torch.Tensor:
    """[1, 1, P, P] bool, True where attention crosses a block boundary (megatron: True = masked)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))
    return (seg[:, None] != seg[None, :])[None, None]


def frame_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Patches of every frame of every image, in order: the blocks of per-image (full) attention."""
    return torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()


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


class MergerMLP(MegatronModule):
    """A norm (the family's), m x m neighbouring patches concatenated, then a GELU MLP to the LM width."""

    def __init__(self, config: TransformerConfig, v, norm: torch.nn.Module):
        super().__init__(config=config)
        self.width = v.hidden_size * v.spatial_merge_size ** 2
        self.norm = norm
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.width, self.width, config=config, init_method=config.init_method, bias=True, gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.width, v.out_hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """Each patch normed, then merged: [P, hv] -> [N, 1, m^2*hv]."""
        return self.norm(x).reshape(-1, 1, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.linear_fc1(self.normed(x))  # [N, 1, m^2*hv/tp]
        y, _ = self.linear_fc2(F.gelu(y))  # [N, 1, h]
        return y.squeeze(1)


class VisionTowerBase(MegatronModule):
    """Patch embedding, the transformer blocks and the 2D rotary frequencies; a family adds its own parts (before
    the blocks: ``_embeddings``; after: ``_heads``) and names every non-block part in ``_state_parts``."""

    patch_bias = False

    def __init__(self, config: TransformerConfig, v, layer_spec: ModuleSpec):
        super().__init__(config=config)
        self.v = v
        # Conv3d with kernel == stride is a linear map of each flattened (c, t, p, p) patch.
        self.patch_embed = torch.nn.Linear(v.patch_dim, v.hidden_size, bias=self.patch_bias,
                                           dtype=config.params_dtype)
        config.init_method(self.patch_embed.weight)
        self._embeddings(config)
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, config=config, layer_number=i + 1) for i in range(v.depth))
        self._heads(config)
        rot = v.hidden_size // v.num_heads // 2  # rotary half-dim per axis pair
        inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _embeddings(self, config: TransformerConfig) -> None:
        """Parameters built after the patch embedding, before the blocks (none by default)."""

    def _heads(self, config: TransformerConfig) -> None:
        """Parameters built after the blocks: the merger(s)."""
        raise NotImplementedError

    def _state_parts(self) -> list:
        """(name, module) of every part that is not a block, for the sharded state dict."""
        raise NotImplementedError

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return vision_sharded_state_dict(self.layers, self._state_parts(), prefix, sharded_offsets, metadata)

    def _rotary(self, grid_thw: torch.Tensor, device) -> torch.Tensor:
        """2D rotary angles of every patch [P, hd]: rows on the first quarter pairs, columns on the second."""
        pos = vision_position_ids(grid_thw, self.v.spatial_merge_size).to(device)  # [P, 2]
        freqs = pos[..., None].float() * self.inv_freq.to(device)  # [P, 2, hd/4]
        half = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [P, hd/2]: rows then cols
        return torch.cat([half, half], dim=-1)  # [P, hd]
