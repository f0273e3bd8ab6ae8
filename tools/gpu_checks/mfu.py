"""Section 3 of the GPU check: training-step model FLOP utilisation of a 7B-shaped stack (Qwen2.5-7B width, a few
layers, full vocabulary, bf16, local spec, megatron DDP + Adam), and the same with the distributed optimizer
(DP=1). Leaves the plain run's peak memory and its estimate in ``STATE["stack"]`` for section 4.

Legend: z the section's size dict (layers, hidden, heads, kv_heads, ffn, vocab, seq, micro_batch, micro_batches,
steps); b micro-batch rows, s sequence length.
"""

from __future__ import annotations

import gc

from .common import FAIL, OK, SKIP, STATE, row


def _stack(z: dict):
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_papo.models import local_layer_spec
    from megatron_papo.platform import device, has_gpu

    dtype = torch.bfloat16 if has_gpu() else torch.float32                   # bf16 optimizer is GPU-only
    cfg = TransformerConfig(
        num_layers=z["layers"], hidden_size=z["hidden"], num_attention_heads=z["heads"],
        num_query_groups=z["kv_heads"], ffn_hidden_size=z["ffn"], kv_channels=z["hidden"] // z["heads"],
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, use_cpu_initialization=not has_gpu(),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    model = GPTModel(config=cfg, transformer_layer_spec=local_layer_spec(), vocab_size=z["vocab"],
                     max_sequence_length=z["seq"], position_embedding_type="rope", rotary_base=1e6,
                     share_embeddings_and_output_weights=False, parallel_output=True)
    return model.to(device()), cfg


def stack_flops_per_token(z: dict) -> float:
    """Model FLOPs per token of forward + backward: 6 x matmul parameters + causal attention (6 x s x h per layer)."""
    h, kv = z["hidden"], z["kv_heads"] * z["hidden"] // z["heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * z["ffn"]
    return 6 * (z["layers"] * per_layer + z["vocab"] * h) + 6 * z["layers"] * z["seq"] * h


def estimate_stack_bytes(z: dict, params: int) -> float:
    """bf16 weights 2 + fp32 main grads 4 + fp32 master weights 4 + Adam moments 8 bytes per parameter, plus
    activations (~34 bytes x h per token per layer, flash-style attention) and the logits (bf16 + fp32 loss)."""
    tokens = z["seq"] * z["micro_batch"]
    return params * 18 + tokens * z["layers"] * z["hidden"] * 34 + tokens * z["vocab"] * 10


def _train_steps(z: dict, distributed: bool):
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_papo.config import OptimizerConfig
    from megatron_papo.platform import Timer, device, max_memory_allocated, reset_peak_memory
    from megatron_papo.training.optimizer import build_optimizer, optimizer_step, wrap_ddp, zero_grads

    model, cfg = _stack(z)
    ocfg = OptimizerConfig(use_distributed_optimizer=distributed)
    ddp = wrap_ddp(model, ocfg)
    opt, sched = build_optimizer(ocfg, [ddp], 100, cfg.params_dtype)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, z["vocab"], (z["micro_batch"], z["seq"] + 1), generator=g).to(device())
               for _ in range(z["micro_batches"])]
    pos = torch.arange(z["seq"], device=device())[None].expand(z["micro_batch"], -1)

    def forward_step(it, m):
        x = next(it)
        loss = m(x[:, :-1], pos, None, labels=x[:, 1:])                     # [b, s] per-token loss
        return loss, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

    def step():
        zero_grads(opt, [ddp])
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
                                    num_microbatches=len(batches), seq_length=z["seq"],
                                    micro_batch_size=z["micro_batch"], forward_only=False)
        return optimizer_step(opt, sched, [ddp])

    step()                                                                   # warm-up: allocator, kernels
    reset_peak_memory()
    with Timer() as t:
        results = [step() for _ in range(z["steps"])]
    params = sum(p.numel() for p in model.parameters())
    return t.seconds / z["steps"], max_memory_allocated(), params, all(r.applied for r in results)


def section_mfu(args) -> None:
    from megatron_papo.platform import has_gpu, init_model_parallel
    from megatron_papo.platform.gpu import bf16_peak_flops

    init_model_parallel(1, 1)
    z = args.sizes["stack"]
    peak = bf16_peak_flops()
    shape = (f"{z['layers']}L h{z['hidden']} ffn{z['ffn']} V{z['vocab']} "
             f"s{z['seq']}x{z['micro_batch']}x{z['micro_batches']}")
    for distributed in (False, True):
        name = "distributed optimizer (DP=1)" if distributed else "plain optimizer"
        if distributed and not has_gpu():
            row("3 mfu", name, "GPU-only in megatron-core 0.16.1", "", SKIP)
            continue
        sec, peak_bytes, params, applied = _train_steps(z, distributed)
        gc.collect()                                                     # free this model before the next
        flops = stack_flops_per_token(z) * z["seq"] * z["micro_batch"] * z["micro_batches"] / sec
        mfu = f"MFU {flops / peak:.1%}" if peak else "peak unknown"
        row("3 mfu", f"{name}: {shape}", f"{flops / 1e12:.3g} TFLOP/s, {mfu}, {sec * 1e3:.0f} ms/step",
            f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "", OK if applied else FAIL)
        if not distributed:
            STATE["stack"] = (peak_bytes, estimate_stack_bytes(z, params))
