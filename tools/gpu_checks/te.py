"""Section 5 of the GPU check: Transformer Engine. Where it imports, TE-spec logits against the local spec on the same
weights and one FP8 step per recipe this GPU runs against bf16; where it does not, says so (SKIP).

Legend: b rows, s sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses

from .common import FAIL, OK, SKIP, close, row


def _te_local_map(key: str) -> str:
    return (key.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
               .replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))


def _te_step(model, ids):
    import torch

    logits = model(ids[:, :-1])                                             # [b, s, V]
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return float(loss), all(bool(torch.isfinite(g).all()) for g in grads)


def section_te(args) -> None:
    import torch

    from megatron_papo.models import build_vlm, get_preset
    from megatron_papo.models.fp8_padding import padded_seq_len, token_multiple
    from megatron_papo.platform import device, fp8_available, has_gpu, init_model_parallel
    from megatron_papo.platform.gpu import FP8_RECIPES, device_capability, fp8_recipe_support

    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        row("5 te", "Transformer Engine", f"not importable here ({type(e).__name__})", "FP8 checks need TE", SKIP)
        return
    if not has_gpu():
        row("5 te", "Transformer Engine", "imports, but no GPU", "", SKIP)
        return
    init_model_parallel(1, 1)
    # every GEMM dimension a multiple of 128, as FP8 (and blockwise scaling's 128-blocks) wants
    spec = dataclasses.replace(get_preset("tiny"), hidden_size=512, num_heads=4, num_kv_heads=2,
                               intermediate_size=1536, mrope_section=(16, 24, 24),
                               vision=dataclasses.replace(get_preset("tiny").vision, out_hidden_size=512))
    kw = dict(vocab_size=512, image_token_id=511, vision_start_token_id=510, params_dtype=torch.bfloat16)
    local = build_vlm(spec, transformer_impl="local", **kw)
    te = build_vlm(spec, transformer_impl="transformer_engine", **kw)
    src = local.state_dict()
    te.load_state_dict({k: src[_te_local_map(k)] if _te_local_map(k) in src else v
                        for k, v in te.state_dict().items()})
    ids = torch.randint(0, 500, (4, padded_seq_len(37, 4, 32) + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device())
    with torch.no_grad():
        a, b = local(ids[:, :-1]).float(), te(ids[:, :-1]).float()
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    row("5 te", f"TE spec logits vs local (TE {transformer_engine.__version__})", f"max diff {diff:.4f}",
        f"logit scale {scale:.3f}", OK if diff <= 0.02 * scale + 0.02 else FAIL)
    base, finite = _te_step(te, ids)
    row("5 te", "bf16 step (TE spec)", f"loss {base:.4f}", "", OK if finite else FAIL)
    ok, why = fp8_available()
    for recipe in FP8_RECIPES:
        runs, why_not = fp8_recipe_support(recipe, device_capability(), torch.version.cuda)
        if not (ok and runs):
            row("5 te", f"FP8 step, recipe {recipe}", "not run", (why or why_not)[:90], SKIP)
            continue
        fp8 = build_vlm(spec, transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe=recipe, **kw)
        fp8.load_state_dict({k: v for k, v in te.state_dict().items() if not k.endswith("_extra_state")},
                            strict=False)
        x = ids[:, :padded_seq_len(ids.shape[1] - 1, 4, token_multiple("hybrid", recipe)) + 1]
        loss, finite = _te_step(fp8, x)
        row("5 te", f"FP8 step, recipe {recipe}", f"loss {loss:.4f}", f"bf16 {base:.4f} (rel 0.05)",
            OK if finite and close(loss, base, 0.05, 0.02) else FAIL)
