"""Model FLOPs of the VLM passes an RL step runs, counted from the architecture (multiply-add = 2 FLOPs).

Counted: every matrix multiply of the vision tower (patch embedding, attention projections, SwiGLU MLP, merger)
and the language model (attention projections, SwiGLU MLP, output layer), and attention's two products
(scores and weighted values: 4 x context x heads x head_dim per query token and layer; causal in the language
model, each image window / whole image in the vision tower). Not counted: norms, rotary, softmax, embedding
lookup (a few percent at most). A backward pass is twice its forward. Padding is never counted: these are the
FLOPs of the useful tokens, so packing raises utilisation and prefix sharing lowers the scoring work counted.

Legend: s sequence length, c attention context, P image patches.
"""

from __future__ import annotations

from megatron_papo.models import family_of_spec, padded_vocab_size


def lm_matmul_params(spec) -> int:
    """Weights one language-model token multiplies through: all layers' projections and MLP, and the output."""
    h, hd = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * spec.intermediate_size
    return spec.num_layers * layer + h * padded_vocab_size(spec.vocab_size)


def lm_flops(spec, length: int, context: int = 0) -> float:
    """Forward FLOPs of ``length`` causal tokens after ``context`` cached ones (a prompt, a response, a row)."""
    q = spec.num_heads * spec.head_dim
    attended = length * context + length * (length + 1) / 2           # sum over the tokens of their context
    return 2.0 * lm_matmul_params(spec) * length + 4.0 * q * spec.num_layers * attended


def vision_flops(spec, grid_thw) -> float:
    """Forward FLOPs of the vision tower and merger(s) for images of patch grids ``grid_thw`` ([n, 3] rows t, h, w),
    counted by the spec's family (``models.registry``: Qwen2.5-VL windows and SwiGLU, Qwen3-VL full attention,
    GELU MLP and DeepStack mergers)."""
    return family_of_spec(spec).vision_flops(spec, grid_thw)


def sequences_flops(spec, rows: list[tuple[int, int, object]]) -> tuple[float, float]:
    """(language, vision) forward FLOPs of whole sequences: ``rows`` of (prompt tokens, response tokens, image
    grid [n, 3] or None)."""
    lm = sum(lm_flops(spec, p + r) for p, r, _ in rows)
    vis = sum(vision_flops(spec, g) for _, _, g in rows if g is not None)
    return lm, vis


def decode_flops(spec, prompt: int, new_tokens: int) -> float:
    """FLOPs of generating ``new_tokens`` one at a time after a ``prompt``-token prefill (each token attends to
    everything before it)."""
    return lm_flops(spec, new_tokens, context=prompt)
