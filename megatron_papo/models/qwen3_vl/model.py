"""Qwen3-VL composition: the shared ``VLMBase`` (``models.common.vlm``) with a megatron GPTModel configured as
Qwen3 (GQA, per-head q/k RMSNorm, no QKV bias, SwiGLU, interleaved M-RoPE), plus DeepStack:
the features of the vision blocks in ``deepstack_visual_indexes`` go through their own mergers and are added to
the hidden states at the image tokens after decoder layers 0, 1, ..., K-1.

DeepStack under pipeline parallelism: the vision tower lives on the first stage. When every deepstack layer sits
on the first stage nothing else changes. When a split falls among them, the first stage sends the features that
later stages need along with its hidden states, concatenated on the hidden axis ([s, b, h * (1 + C)], C carried
features, zeros when there are no images), every stage up to the last passes them on, and megatron's schedule
exchanges tensor shapes (``variable_seq_lengths``). Backward carries the features' gradients back the same way.
Which of the two (``_Pipe`` or ``_CarryPipe``) is chosen once, at build time.

Legend: b batch, s sequence, h LM width, V padded vocabulary, tp tensor-parallel size, K deepstack features,
C of them carried between stages.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer import TransformerConfig

from megatron_papo.models.common.vlm import VLMBase
from megatron_papo.models.qwen3_vl.configs import language_config, vision_config
from megatron_papo.models.qwen3_vl.layers import InterleavedMRoPE, language_block_spec
from megatron_papo.models.qwen3_vl.vision import Qwen3VisionTower


class _Pipe:
    """Nothing but hidden states between stages."""

    width_factor = 1

    def pack(self, out, features):
        return out

    def unpack(self, received):
        return received, None


class _CarryPipe:
    """Hidden states and the C deepstack features later stages need, concatenated on the hidden axis."""

    def __init__(self, hidden: int, carried: range):
        self.hidden, self.carried = hidden, carried
        self.width_factor = 1 + len(carried)

    def pack(self, out, features):
        """out [s, b, h]; features [K, s, b, h] on the first stage, [C, s, b, h] later, None: no images."""
        if features is None:
            return torch.cat([out] + [torch.zeros_like(out)] * len(self.carried), dim=-1)
        if features.shape[0] != len(self.carried):  # the first stage: keep only what later stages read
            features = features[self.carried.start:self.carried.stop]
        return torch.cat([out] + list(features.unbind(0)), dim=-1)  # [s, b, h * (1 + C)]

    def unpack(self, received):
        hidden, *features = received.split(self.hidden, dim=-1)
        return hidden, torch.stack(features)  # [s, b, h], [C, s, b, h]


class Qwen3VLModel(VLMBase):
    language_config = staticmethod(language_config)
    vision_config = staticmethod(vision_config)
    vision_tower = Qwen3VisionTower
    vision_normalization = "LayerNorm"
    _received_features = None

    def _layer_spec(self, transformer_impl: str, lm_cfg: TransformerConfig):
        """Deepstack layers where the stage holds global layers < K; chooses what rides between stages."""
        spec = self.spec
        per_stage = spec.num_layers // lm_cfg.pipeline_model_parallel_size
        first = parallel_state.get_pipeline_model_parallel_rank() * per_stage
        carried = range(per_stage, max(per_stage, spec.num_deepstack))  # features used beyond the first stage
        self.pipe = _CarryPipe(spec.hidden_size, carried) if len(carried) else _Pipe()
        lm_cfg.variable_seq_lengths = len(carried) > 0  # stages exchange the widened activation's shape
        return language_block_spec(transformer_impl, range(first, first + per_stage),
                                   0 if self.pre_process else per_stage, spec.num_deepstack)

    def _language_model(self, lm_cfg: TransformerConfig, layer_spec) -> GPTModel:
        model = super()._language_model(lm_cfg, layer_spec)
        model.rotary_pos_emb = InterleavedMRoPE(self.spec.head_dim, self.spec.rope_theta)
        return model

    @property
    def pipeline_hidden_size(self) -> int:
        """Width of the activation one stage sends the next: h, or h * (1 + C) when deepstack features ride along."""
        return self.spec.hidden_size * self.pipe.width_factor

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        hidden, self._received_features = (None, None) if input_tensor is None else self.pipe.unpack(input_tensor)
        self.language_model.set_input_tensor(hidden)

    def _vision_features(self, pixel_values, image_grid_thw):
        return self.vision(pixel_values, image_grid_thw)  # [N, h], K x [N, h]

    def _scatter_context(self, deepstack, emb: torch.Tensor, s_idx, b_idx) -> torch.Tensor:
        """The deepstack features [K, s, b, h], zero off the image slots."""
        dense = emb.new_zeros(len(deepstack), *emb.shape)  # [K, s, b, h]
        dense[:, s_idx, b_idx] = torch.stack(deepstack).to(emb.dtype)
        return dense

    def _sequence_parallel_split(self, decoder_input: torch.Tensor, features):
        """[s/tp, b, h] and the deepstack features [K, s/tp, b, h] (None: no images)."""
        if features is not None:
            features = scatter_to_sequence_parallel_region(features.transpose(0, 1)).transpose(0, 1)
        return scatter_to_sequence_parallel_region(decoder_input), features

    def _received_context(self):
        return self._received_features

    def _block_kwargs(self, features) -> dict:
        return {"extra_block_kwargs": {"context": features}}

    def _stage_output(self, out: torch.Tensor, features) -> torch.Tensor:
        """[s, b, h], or [s, b, h * (1 + C)] when deepstack features ride along."""
        return self.pipe.pack(out, features)
