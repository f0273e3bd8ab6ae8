"""Qwen2.5-VL composition: vision tower features scattered into the `<|image_pad|>` embeddings of a megatron
GPTModel configured as Qwen2.5 (GQA, QKV bias, RMSNorm, SwiGLU, M-RoPE), vocab-parallel output.

With pipeline parallelism the vision tower and embedding live on the first stage, the output layer on the
last; every stage needs position ids (M-RoPE is applied in every layer), computed from input_ids when absent.
The vocabulary is padded to a multiple of 128 so its TP split is the same at any TP size; padded columns of
the logits are -inf.

Legend: b batch, s sequence, h LM width, V padded vocabulary, tp tensor-parallel size.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule

from megatron_papo.models import fp8_padding
from megatron_papo.models.configs import check_tp_divisibility, language_config, vision_config
from megatron_papo.models.presets import VLMSpec, get_preset
from megatron_papo.models.rope_index import get_packed_rope_index, get_rope_index
from megatron_papo.models.specs import check_transformer_impl, language_block_spec, vision_layer_spec
from megatron_papo.models.vision import VisionTower
from megatron_papo.platform import device

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


class Qwen25VLModel(MegatronModule):
    # what megatron's pipeline schedules read off a model chunk
    model_type = ModelType.encoder_or_decoder

    def __init__(self, spec: VLMSpec, *, transformer_impl: str, fp8: str | None, fp8_recipe: str,
                 params_dtype: torch.dtype, freeze_vision: bool, pre_process: bool, post_process: bool,
                 recompute: bool = False, sequence_parallel: bool = False):
        lm_cfg = language_config(spec, params_dtype=params_dtype, fp8=fp8, fp8_recipe=fp8_recipe, recompute=recompute,
                                 sequence_parallel=sequence_parallel)
        super().__init__(config=lm_cfg)
        self.spec = spec
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = padded_vocab_size(spec.vocab_size)
        per_stage = lm_cfg.num_layers // lm_cfg.pipeline_model_parallel_size
        self.language_model = GPTModel(
            config=lm_cfg, transformer_layer_spec=language_block_spec(transformer_impl, per_stage),
            vocab_size=self.padded_vocab_size, max_sequence_length=spec.max_position_embeddings,
            pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=spec.tie_word_embeddings, position_embedding_type="mrope",
            rotary_base=spec.rope_theta, parallel_output=True,
            scatter_embedding_sequence_parallel=False)  # forward scatters, after the image features go in
        self.vision = None
        if pre_process:
            # the vision tower never runs in FP8 (fp8_padding: varying patch counts, MLP width not 16-aligned)
            vis_cfg = vision_config(spec, params_dtype=params_dtype, fp8=None, recompute=recompute)
            self.vision = VisionTower(vis_cfg, spec.vision, vision_layer_spec(transformer_impl))
            if freeze_vision:
                self.vision.requires_grad_(False)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """megatron's ``finalize_model_grads`` sums tied embedding gradients of the first and last stages."""
        return self.language_model.share_embeddings_and_output_weights

    @property
    def pipeline_hidden_size(self) -> int:
        """Width of the activation one pipeline stage sends the next."""
        return self.spec.hidden_size

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def position_ids(self, input_ids: torch.Tensor, image_grid_thw=None, attention_mask=None,
                     packed_seq_params=None) -> torch.Tensor:
        """M-RoPE position ids [3, b, s] (HF rule); attention_mask here is [b, s] with 1 = real token. With
        ``packed_seq_params`` (one packed sequence, b = 1) each of its sequences is positioned on its own."""
        if packed_seq_params is not None:
            return get_packed_rope_index(input_ids, packed_seq_params.cu_seqlens_q, image_grid_thw,
                                         self.spec.vision.spatial_merge_size, image_token_id=self.spec.image_token_id,
                                         vision_start_token_id=self.spec.vision_start_token_id)
        return get_rope_index(input_ids, image_grid_thw, attention_mask, self.spec.vision.spatial_merge_size,
                              image_token_id=self.spec.image_token_id,
                              vision_start_token_id=self.spec.vision_start_token_id)[0]

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        """Token embeddings with image features in the image-token slots: [s, b, h] (first stage only)."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        is_image = input_ids == self.spec.image_token_id  # [b, s]
        num_slots = int(is_image.sum())
        if pixel_values is None:
            if num_slots:
                raise ValueError(f"input_ids hold {num_slots} image tokens but no pixel_values were given")
            return emb
        feats = self.vision(pixel_values, image_grid_thw).to(emb.dtype)  # [N, h], sample 0's images first
        if feats.shape[0] != num_slots:
            raise ValueError(f"image tokens ({num_slots}) and image features ({feats.shape[0]}, from "
                             f"image_grid_thw) do not match; expand each image to t*h*w/4 <|image_pad|> tokens")
        b_idx, s_idx = torch.nonzero(is_image, as_tuple=True)  # batch-major, like HF masked_scatter on [b, s]
        emb = emb.clone()
        emb[s_idx, b_idx] = feats
        return emb

    def forward(self, input_ids, position_ids=None, attention_mask=None, pixel_values=None,
                image_grid_thw=None, inference_context=None, runtime_gather_output=None, packed_seq_params=None):
        """Logits [b, s, V/tp] on the last stage (V when gathered), hidden states [s, b, h] elsewhere.

        attention_mask is megatron's boolean mask (True = masked out) or None for plain causal attention.
        ``packed_seq_params`` (megatron's ``PackedSeqParams``, qkv_format ``thd``): ``input_ids`` [1, s] holds
        several sequences back to back, each attending causally to itself only (``megatron_papo.training.packing``).
        """
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, packed_seq_params=packed_seq_params)
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        if decoder_input is not None and self.config.sequence_parallel:  # [s/tp, b, h] from here on
            decoder_input = scatter_to_sequence_parallel_region(decoder_input)
        out = self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                  inference_context=inference_context,
                                  runtime_gather_output=runtime_gather_output, packed_seq_params=packed_seq_params)
        if self.post_process and self.padded_vocab_size != self.spec.vocab_size:
            out = self._mask_vocab_padding(out)
        return out

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        width = logits.shape[-1]
        start = 0 if width == self.padded_vocab_size else parallel_state.get_tensor_model_parallel_rank() * width
        pad = torch.arange(start, start + width, device=logits.device) >= self.spec.vocab_size  # [V/tp]
        return logits.masked_fill(pad, float("-inf")) if bool(pad.any()) else logits


def build_vlm(preset: str | VLMSpec, *, vocab_size: int | None = None, image_token_id: int | None = None,
              vision_start_token_id: int | None = None, transformer_impl: str = "local", fp8: str | None = None,
              fp8_recipe: str = "delayed", params_dtype: torch.dtype = torch.float32, freeze_vision: bool = False,
              pre_process: bool | None = None, post_process: bool | None = None,
              recompute: bool = False) -> Qwen25VLModel:
    """This rank's part of a Qwen2.5-VL model (megatron parallel_state must be initialised).

    vocab_size / image_token_id / vision_start_token_id override the preset's (the tokenizer decides them).
    """
    spec = get_preset(preset) if isinstance(preset, str) else preset
    overrides = {k: val for k, val in dict(vocab_size=vocab_size, image_token_id=image_token_id,
                                          vision_start_token_id=vision_start_token_id).items() if val is not None}
    spec = dataclasses.replace(spec, **overrides)
    spec.validate()
    check_transformer_impl(transformer_impl, fp8, fp8_recipe)
    check_tp_divisibility(spec, parallel_state.get_tensor_model_parallel_world_size())
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    fp8_padding.configure(fp8, fp8_recipe)      # micro-batches are padded to FP8's token alignment
    model = Qwen25VLModel(spec, transformer_impl=transformer_impl, fp8=fp8, fp8_recipe=fp8_recipe,
                          params_dtype=params_dtype, freeze_vision=freeze_vision, pre_process=pre_process,
                          post_process=post_process, recompute=recompute)
    return model.to(device())                    # built on the CPU (use_cpu_initialization), run on this rank's GPU
