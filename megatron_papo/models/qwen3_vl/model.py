"""Qwen3-VL composition: vision features scattered into the `<|image_pad|>` embeddings of a megatron GPTModel
configured as Qwen3 (GQA, per-head q/k RMSNorm, no QKV bias, SwiGLU, interleaved M-RoPE), plus DeepStack:
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
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule

from megatron_papo.models.qwen3_vl.configs import language_config, vision_config
from megatron_papo.models.qwen3_vl.layers import InterleavedMRoPE, language_block_spec, vision_layer_spec
from megatron_papo.models.qwen3_vl.spec import Qwen3VLSpec
from megatron_papo.models.qwen3_vl.vision import Qwen3VisionTower
from megatron_papo.models.rope_index import get_rope_index
from megatron_papo.models.vlm import padded_vocab_size


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


class Qwen3VLModel(MegatronModule):
    # what megatron's pipeline schedules read off a model chunk
    model_type = ModelType.encoder_or_decoder

    def __init__(self, spec: Qwen3VLSpec, *, transformer_impl: str, fp8: str | None, fp8_recipe: str,
                 params_dtype: torch.dtype, freeze_vision: bool, pre_process: bool, post_process: bool,
                 recompute: bool = False, sequence_parallel: bool = False):
        lm_cfg = language_config(spec, params_dtype=params_dtype, fp8=fp8, fp8_recipe=fp8_recipe, recompute=recompute,
                                 sequence_parallel=sequence_parallel)
        super().__init__(config=lm_cfg)
        self.spec = spec
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = padded_vocab_size(spec.vocab_size)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        per_stage = spec.num_layers // lm_cfg.pipeline_model_parallel_size
        first = pp_rank * per_stage
        carried = range(per_stage, max(per_stage, spec.num_deepstack))  # features used beyond the first stage
        self.pipe = _CarryPipe(spec.hidden_size, carried) if len(carried) else _Pipe()
        lm_cfg.variable_seq_lengths = len(carried) > 0  # stages exchange the widened activation's shape
        block = language_block_spec(transformer_impl, range(first, first + per_stage),
                                    0 if pre_process else per_stage, spec.num_deepstack)
        self.language_model = GPTModel(
            config=lm_cfg, transformer_layer_spec=block, vocab_size=self.padded_vocab_size,
            max_sequence_length=spec.max_position_embeddings, pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=spec.tie_word_embeddings, position_embedding_type="mrope",
            rotary_base=spec.rope_theta, parallel_output=True,
            scatter_embedding_sequence_parallel=False)  # forward scatters, after the image features go in
        self.language_model.rotary_pos_emb = InterleavedMRoPE(spec.head_dim, spec.rope_theta)
        self.vision = None
        if pre_process:
            vis_cfg = vision_config(spec, params_dtype=params_dtype, fp8=fp8, fp8_recipe=fp8_recipe,
                                    recompute=recompute)
            self.vision = Qwen3VisionTower(vis_cfg, spec.vision, vision_layer_spec(transformer_impl))
            if freeze_vision:
                self.vision.requires_grad_(False)
        self._received_features = None

    @property
    def pipeline_hidden_size(self) -> int:
        """Width of the activation one stage sends the next: h, or h * (1 + C) when deepstack features ride along."""
        return self.spec.hidden_size * self.pipe.width_factor

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """megatron's ``finalize_model_grads`` sums tied embedding gradients of the first and last stages."""
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        hidden, self._received_features = (None, None) if input_tensor is None else self.pipe.unpack(input_tensor)
        self.language_model.set_input_tensor(hidden)

    def position_ids(self, input_ids: torch.Tensor, image_grid_thw=None, attention_mask=None) -> torch.Tensor:
        """M-RoPE position ids [3, b, s] (the Qwen2-VL rule, which Qwen3-VL keeps for images)."""
        return get_rope_index(input_ids, image_grid_thw, attention_mask, self.spec.vision.spatial_merge_size,
                              image_token_id=self.spec.image_token_id,
                              vision_start_token_id=self.spec.vision_start_token_id)[0]

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None):
        """(token embeddings with image features in the image slots [s, b, h], deepstack features [K, s, b, h]
        zero off the image slots, or None without images); first stage only."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        is_image = input_ids == self.spec.image_token_id  # [b, s]
        num_slots = int(is_image.sum())
        if pixel_values is None:
            if num_slots:
                raise ValueError(f"input_ids hold {num_slots} image tokens but no pixel_values were given")
            return emb, None
        feats, deepstack = self.vision(pixel_values, image_grid_thw)  # [N, h], K x [N, h]
        if feats.shape[0] != num_slots:
            raise ValueError(f"image tokens ({num_slots}) and image features ({feats.shape[0]}, from "
                             f"image_grid_thw) do not match; expand each image to t*h*w/4 <|image_pad|> tokens")
        b_idx, s_idx = torch.nonzero(is_image, as_tuple=True)  # batch-major, like HF masked_scatter on [b, s]
        emb = emb.clone()
        emb[s_idx, b_idx] = feats.to(emb.dtype)
        dense = emb.new_zeros(len(deepstack), *emb.shape)  # [K, s, b, h]
        dense[:, s_idx, b_idx] = torch.stack(deepstack).to(emb.dtype)
        return emb, dense

    def forward(self, input_ids, position_ids=None, attention_mask=None, pixel_values=None,
                image_grid_thw=None, inference_context=None, runtime_gather_output=None):
        """Logits [b, s, V/tp] on the last stage (V when gathered), the activation for the next stage elsewhere
        ([s, b, h], or [s, b, h * (1 + C)] when deepstack features ride along)."""
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw)
        decoder_input, features = None, self._received_features
        if self.pre_process:
            decoder_input, features = self.embed(input_ids, pixel_values, image_grid_thw)
            if self.config.sequence_parallel:  # [s/tp, b, h] and [K, s/tp, b, h] from here on
                decoder_input = scatter_to_sequence_parallel_region(decoder_input)
                if features is not None:
                    features = scatter_to_sequence_parallel_region(features.transpose(0, 1)).transpose(0, 1)
        out = self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                  inference_context=inference_context, runtime_gather_output=runtime_gather_output,
                                  extra_block_kwargs={"context": features})
        if not self.post_process:
            return self.pipe.pack(out, features)
        if self.padded_vocab_size != self.spec.vocab_size:
            out = self._mask_vocab_padding(out)
        return out

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        width = logits.shape[-1]
        start = 0 if width == self.padded_vocab_size else parallel_state.get_tensor_model_parallel_rank() * width
        pad = torch.arange(start, start + width, device=logits.device) >= self.spec.vocab_size  # [V/tp]
        return logits.masked_fill(pad, float("-inf")) if bool(pad.any()) else logits
