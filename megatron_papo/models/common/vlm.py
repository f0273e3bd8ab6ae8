"""The VLM composition both families share: vision features scattered into the `<|image_pad|>` embeddings of a
megatron GPTModel with M-RoPE, vocab-parallel output.

``VLMBase`` holds everything that does not depend on the family: the GPTModel and its M-RoPE position ids
(computed from input_ids when absent, per sequence under packing), the embedding merge, pipeline plumbing, the
vocabulary padding and the build order. A family subclasses it with its TransformerConfigs, layer specs and vision
tower, and overrides the hooks where it differs (Qwen3-VL: the rotary table, DeepStack features); all of it is
decided at build time, never inside ``forward``.

With pipeline parallelism the vision tower and embedding live on the first stage, the output layer on the
last; every stage needs position ids (M-RoPE is applied in every layer). The vocabulary is padded to a multiple
of 128 so its TP split is the same at any TP size; padded columns of the logits are -inf.

Legend: b batch, s sequence, h LM width, V padded vocabulary, tp tensor-parallel size, N image tokens.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_papo.models.common.rope_index import get_packed_rope_index, get_rope_index
from megatron_papo.models.common.specs import language_block_spec, vision_layer_spec

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


class VLMBase(MegatronModule):
    """This rank's part of a VLM. A family sets ``language_config`` / ``vision_config`` (staticmethods ``(spec,
    **options) -> TransformerConfig``), ``vision_tower`` (the tower's class) and ``vision_normalization``, and
    overrides the hooks below where it differs."""

    # what megatron's pipeline schedules read off a model chunk
    model_type = ModelType.encoder_or_decoder
    language_config: staticmethod
    vision_config: staticmethod
    vision_tower: type
    # the local vision layer spec's norm
    vision_normalization = "RMSNorm"

    def __init__(self, spec, *, transformer_impl: str, fp8: str | None, fp8_recipe: str,
                 params_dtype: torch.dtype, freeze_vision: bool, pre_process: bool, post_process: bool,
                 recompute: bool = False, sequence_parallel: bool = False):
        lm_cfg = self.language_config(spec, params_dtype=params_dtype, fp8=fp8, fp8_recipe=fp8_recipe,
                                      recompute=recompute, sequence_parallel=sequence_parallel)
        super().__init__(config=lm_cfg)
        self.spec = spec
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = padded_vocab_size(spec.vocab_size)
        self.language_model = self._language_model(lm_cfg, self._layer_spec(transformer_impl, lm_cfg))
        self.vision = None
        if pre_process:
            # the vision tower never runs in FP8 (fp8_padding: varying patch counts, MLP width not 16-aligned)
            vis_cfg = self.vision_config(spec, params_dtype=params_dtype, recompute=recompute)
            layer_spec = vision_layer_spec(transformer_impl, self.vision_normalization)
            self.vision = self.vision_tower(vis_cfg, spec.vision, layer_spec)
            if freeze_vision:
                self.vision.requires_grad_(False)

    def _layer_spec(self, transformer_impl: str, lm_cfg: TransformerConfig):
        """This stage's decoder layers and final norm (TransformerBlockSubmodules)."""
        return language_block_spec(transformer_impl, lm_cfg.num_layers // lm_cfg.pipeline_model_parallel_size)

    def _language_model(self, lm_cfg: TransformerConfig, layer_spec) -> GPTModel:
        spec = self.spec
        return GPTModel(
            config=lm_cfg, transformer_layer_spec=layer_spec, vocab_size=self.padded_vocab_size,
            max_sequence_length=spec.max_position_embeddings, pre_process=self.pre_process,
            post_process=self.post_process, share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="mrope", rotary_base=spec.rope_theta, parallel_output=True,
            scatter_embedding_sequence_parallel=False)  # forward scatters, after the image features go in

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
        ids = dict(image_token_id=self.spec.image_token_id, vision_start_token_id=self.spec.vision_start_token_id)
        merge = self.spec.vision.spatial_merge_size
        if packed_seq_params is not None:
            return get_packed_rope_index(input_ids, packed_seq_params.cu_seqlens_q, image_grid_thw, merge, **ids)
        return get_rope_index(input_ids, image_grid_thw, attention_mask, merge, **ids)[0]

    def image_slots(self, input_ids: torch.Tensor, num_features: int | None):
        """(batch, sequence) indices [N] of the image tokens, batch-major like HF's masked_scatter on [b, s];
        ValueError when they do not match the ``num_features`` image features (None: no images given)."""
        is_image = input_ids == self.spec.image_token_id  # [b, s]
        num_slots = int(is_image.sum())
        if num_features is None and num_slots:
            raise ValueError(f"input_ids hold {num_slots} image tokens but no pixel_values were given")
        if num_features is not None and num_features != num_slots:
            raise ValueError(f"image tokens ({num_slots}) and image features ({num_features}, from "
                             f"image_grid_thw) do not match; expand each image to t*h*w/4 <|image_pad|> tokens")
        return torch.nonzero(is_image, as_tuple=True)

    def _stage_input(self, input_ids, pixel_values, image_grid_thw):
        """(decoder input: token embeddings with image features in the image-token slots [s, b, h], None off the
        first stage; the context the decoder layers read, None unless the family has one)."""
        if not self.pre_process:
            return None, self._received_context()
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if pixel_values is None:
            self.image_slots(input_ids, None)
            return emb, None
        feats, extra = self._vision_features(pixel_values, image_grid_thw)  # [N, h], sample 0's images first
        b_idx, s_idx = self.image_slots(input_ids, feats.shape[0])
        emb = emb.clone()
        emb[s_idx, b_idx] = feats.to(emb.dtype)
        return emb, self._scatter_context(extra, emb, s_idx, b_idx)

    def _vision_features(self, pixel_values, image_grid_thw):
        """(image features [N, h], anything more the tower gives for the decoder layers, or None)."""
        return self.vision(pixel_values, image_grid_thw), None

    def _scatter_context(self, extra, emb: torch.Tensor, s_idx, b_idx):
        """The decoder layers' context from the tower's extra features, placed at the image slots."""
        return None

    def _received_context(self):
        """The context a later pipeline stage received with its input (``set_input_tensor``)."""
        return None

    def _block_kwargs(self, context) -> dict:
        """Keyword arguments for megatron's GPTModel.forward that carry ``context`` to the decoder layers."""
        return {}

    def _sequence_parallel_split(self, decoder_input: torch.Tensor, context):
        """This tensor-parallel rank's part of the sequence of the decoder input (and of the context)."""
        return scatter_to_sequence_parallel_region(decoder_input), context

    def _stage_output(self, out: torch.Tensor, context) -> torch.Tensor:
        """What a stage before the last sends the next (its hidden states [s, b, h])."""
        return out

    def forward(self, input_ids, position_ids=None, attention_mask=None, pixel_values=None,
                image_grid_thw=None, inference_context=None, runtime_gather_output=None, packed_seq_params=None):
        """Logits [b, s, V/tp] on the last stage (V when gathered), the activation for the next stage elsewhere.

        attention_mask is megatron's boolean mask (True = masked out) or None for plain causal attention.
        ``packed_seq_params`` (megatron's ``PackedSeqParams``, qkv_format ``thd``): ``input_ids`` [1, s] holds
        several sequences back to back, each attending causally to itself only (``megatron_papo.training.packing``).
        """
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, packed_seq_params=packed_seq_params)
        decoder_input, context = self._stage_input(input_ids, pixel_values, image_grid_thw)
        if decoder_input is not None and self.config.sequence_parallel:  # [s/tp, b, h] from here on
            decoder_input, context = self._sequence_parallel_split(decoder_input, context)
        out = self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                  inference_context=inference_context, runtime_gather_output=runtime_gather_output,
                                  packed_seq_params=packed_seq_params, **self._block_kwargs(context))
        if not self.post_process:
            return self._stage_output(out, context)
        if self.padded_vocab_size != self.spec.vocab_size:
            out = self._mask_vocab_padding(out)
        return out

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        width = logits.shape[-1]
        start = 0 if width == self.padded_vocab_size else parallel_state.get_tensor_model_parallel_rank() * width
        pad = torch.arange(start, start + width, device=logits.device) >= self.spec.vocab_size  # [V/tp]
        return logits.masked_fill(pad, float("-inf")) if bool(pad.any()) else logits
