"""The prepared GPU check: run first whenever a GPU is at hand; one table, non-zero exit on any FAIL.

Sections (each guarded: an exception or its time limit marks that row FAIL and the check goes on):
  1 rl      bf16 RL steps of the tiny VLM through the trainer (NCCL, world size 1): finite losses; the first
            step's loss against an fp32 CPU run of the same rollouts (a subprocess without the GPU) within bf16
            tolerance; save after step 1 + resume in a fresh run = step 2 of the uninterrupted run.
  2 rollout megatron_papo's rollout engine against transformers ``generate``, same weights and GPU, tokens/s at
            n = 8 (prompt sharing) and n = 1.
  3 mfu     training-step model FLOP utilisation of a 7B-shaped stack (Qwen2.5-7B width, a few layers, full
            vocabulary, bf16, local spec, megatron DDP + Adam), and the same with the distributed optimizer (DP=1).
  4 memory  peak CUDA memory of the section-3 step next to an estimate, and of the RL step next to the memory
            plan's figure (training/memory_plan.py, 'plan unavailable' where it is absent).
  5 te      Transformer Engine: where it imports, TE-spec logits against the local spec on the same weights and
            one FP8 step per recipe this GPU runs against bf16; where it does not, says so (SKIP).
  6 graph   graph decode: the engine's fixed-shape decode (row cap, refills) against its normal decode (tokens),
            then captured as CUDA graphs per batch bucket against the same steps run eagerly (tokens identical),
            tokens/s of the three; on CPU the graph rows are SKIP.

Timings come from CUDA events (platform.Timer). ``--budget-s`` bounds the whole check (9 minutes on one GPU by
default); every section also has its own limit. ``--cpu-smoke`` runs the same sections at toy size on the CPU
(gloo, perf_counter timings) in well under two minutes: that is what CI runs.

    make gpu-check                      # installs from .gpu_wheels/ (tools/gpu_wheels.sh) if present, then runs
    python tools/gpu_check.py [--cpu-smoke] [--sections 1,3] [--budget-s 540] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OK, FAIL, SKIP = "ok", "FAIL", "skip"
ROWS: list[tuple] = []  # (section, check, value, reference, status)
STATE: dict = {}        # results one section leaves for another (section 4 reads 1 and 3)


def row(section: str, check: str, value, reference="", status: str = OK) -> None:
    ROWS.append((section, check, str(value), str(reference), status))


def close(a: float, b: float, rel: float, abs_: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * abs(b) + abs_


class SectionTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise SectionTimeout()


def run_section(name: str, fn, limit_s: float, deadline: float, args) -> None:
    """Run one section under min(its limit, what is left of the budget); failures become FAIL rows."""
    left = deadline - time.monotonic()
    if left < 5:
        row(name, "section", "not run: total budget spent", "", FAIL)
        return
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(min(limit_s, left))))
    t0 = time.monotonic()
    try:
        fn(args)
    except SectionTimeout:
        row(name, "section", f"time limit {min(limit_s, left):.0f} s reached", "", FAIL)
    except Exception as e:  # noqa: BLE001 - a blind run must report every failure and go on
        row(name, "section", f"{type(e).__name__}: {str(e).splitlines()[0][:110] if str(e) else ''}", "", FAIL)
        traceback.print_exc()
    finally:
        signal.alarm(0)
    print(f"[gpu_check] section {name} done in {time.monotonic() - t0:.1f} s", flush=True)


# --- 1: RL steps -------------------------------------------------------------------------------------------------
def rl_config(root: str, dtype: str, *sets: str):
    from megatron_papo.config import load_config
    from megatron_papo.training.entry import default_config_tree

    return load_config(None, [
        f"data.train_shards={root}/data", "data.synthetic_samples=24", "data.shuffle_buffer=0", "rollout.n=4",
        "rollout.max_new_tokens=6", "training.prompts_per_step=2", "training.prompts_per_update=2",
        "training.micro_batch_size=4", "training.warmup_sft_steps=0", "optimizer.lr=1e-3",
        "rollout.recompute_old_logprobs=true", f"model.params_dtype={dtype}", f"checkpoint.dir={root}/ckpt",
        "checkpoint.keep_last=0", "logging.tensorboard_dir=null", "logging.progress=false", *sets],
        base=default_config_tree())


def build_rl_run(root: str, dtype: str, init: str, *sets: str):
    """A run whose policy (and reference) start from the weights at ``init`` (written there first if absent)."""
    from megatron_papo.training.checkpoint import load_checkpoint, save_checkpoint
    from megatron_papo.training.trainer import build_run

    run = build_run(rl_config(root, dtype, *sets))
    ctx = run.ctx
    if os.path.isdir(os.path.join(init, "step_0")):
        load_checkpoint(os.path.join(init, "step_0"), [ctx.policy])
    else:
        save_checkpoint(init, 0, [ctx.policy])
    if ctx.reference is not None:
        ctx.reference.load_state_dict(ctx.policy.module.state_dict())
    return run


KEYS = ("actor/loss", "actor/entropy", "actor/perception_kl", "actor/grad_norm")


def vary_rewards() -> None:
    """A deterministic reward of the response text: a random tiny model never answers correctly, and the loss and
    gradients only carry the model's numerics when groups have reward variance (as tests/test_train.py does)."""
    from megatron_papo.training import rl_step as rl

    rl.get_reward = lambda name: (lambda text, answer: {"overall": (len(text) % 3) / 2.0,
                                                        "accuracy": (len(text) % 3) / 2.0, "format": 0.0})


def cpu_reference(root: str) -> None:
    """(subprocess, no GPU) fp32 step 1 from the shared initial weights; writes its rollouts and metrics."""
    import torch

    from megatron_papo.platform import init_distributed
    from megatron_papo.training import rl_step as rl

    init_distributed()
    vary_rewards()
    run = build_rl_run(root, "float32", os.path.join(root, "init"), f"checkpoint.dir={root}/ckpt_ref")
    collected = {}
    real_collect = rl.collect

    def keep(ctx, reader, step):
        collected["out"] = real_collect(ctx, reader, step)
        return collected["out"]

    rl.collect = keep
    metrics = rl.rl_step(run.ctx, iter(run.reader), 1)
    torch.save(collected["out"], os.path.join(root, "rollouts.pt"))
    json.dump({k: float(metrics[k]) for k in KEYS if k in metrics}, open(os.path.join(root, "ref.json"), "w"))


def _replay_step(run, rollouts) -> dict:
    """Step 1 on given rollouts (the CPU reference's) instead of sampling new ones."""
    from megatron_papo.training import rl_step as rl

    real_collect = rl.collect
    rl.collect = lambda ctx, reader, step: rollouts
    try:
        return rl.rl_step(run.ctx, iter(run.reader), 1)
    finally:
        rl.collect = real_collect


def section_rl(args) -> None:
    import torch

    from megatron_papo.platform import has_gpu, max_memory_allocated, reset_peak_memory
    from megatron_papo.training.rl_step import rl_step
    from megatron_papo.training.trainer import resume, save

    dtype = "bfloat16" if has_gpu() else "float32"       # megatron's bf16 optimizer is GPU-only
    root = tempfile.mkdtemp(prefix="gpu_check_rl_")
    init = os.path.join(root, "init")
    vary_rewards()
    straight = build_rl_run(root, dtype, init)            # writes the initial weights everyone starts from
    STATE["rl_cfg"] = straight.ctx.cfg
    it = iter(straight.reader)
    reset_peak_memory()
    m = [rl_step(straight.ctx, it, 1)]
    save(straight, 1)                                     # the resume check below starts from here
    m.append(rl_step(straight.ctx, it, 2))
    STATE["rl_peak_bytes"] = max_memory_allocated()
    losses = [x.get("actor/loss", float("nan")) for x in m]
    row("1 rl", f"{dtype} steps 1-2 loss finite", " ".join(f"{v:.4f}" for v in losses), "",
        OK if all(math.isfinite(v) for v in losses) else FAIL)

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu-reference", root], env=env, check=True,
                   timeout=max(30, args.limits["1"] - 30))
    ref = json.load(open(os.path.join(root, "ref.json")))
    replay_run = build_rl_run(root, dtype, init, f"checkpoint.dir={root}/ckpt_replay")
    got = _replay_step(replay_run, torch.load(os.path.join(root, "rollouts.pt"), weights_only=False))
    for key, rel, abs_ in (("actor/loss", 0.05, 0.02), ("actor/entropy", 0.03, 0.02),
                           ("actor/perception_kl", 0.2, 0.01), ("actor/grad_norm", 0.1, 1e-4)):
        a, b = float(got.get(key, float("nan"))), float(ref.get(key, float("nan")))
        row("1 rl", f"step 1 {key.split('/')[1]} {dtype} vs fp32 CPU", f"{a:.5f}", f"{b:.5f} (rel {rel}, abs {abs_})",
            OK if close(a, b, rel, abs_) else FAIL)

    again = build_rl_run(root, dtype, init, "checkpoint.resume=auto")
    resume(again)
    resumed = rl_step(again.ctx, iter(again.reader), 2)
    tol = (1e-3, 1e-5) if has_gpu() else (0.0, 0.0)      # GPU kernels (atomics in backward) may reorder sums
    for key in ("reward/mean", "actor/loss", "actor/grad_norm"):
        a, b = float(resumed.get(key, float("nan"))), float(m[1].get(key, float("nan")))
        row("1 rl", f"resume at step 2: {key}", f"{a:.6f}", f"{b:.6f} uninterrupted",
            OK if close(a, b, *tol) or a == b else FAIL)


# --- 2: rollout engine vs transformers -----------------------------------------------------------------------------
def _hf_tiny(out_dir: str, hidden: int, layers: int, vocab: int):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = max(2, hidden // 64)
    d = hidden // heads                                                       # head dim
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=2, vocab_size=vocab, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                         rope_scaling={"type": "mrope", "mrope_section": [d // 8, 3 * d // 16, 3 * d // 16],
                                       "rope_theta": 1e6}),
        vision_config=dict(depth=1, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab - 1, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 3,
        video_token_id=vocab - 4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out_dir)
    return model


def _engine(hf_dir: str):
    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.rollout import MegatronEngine

    spec = spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    model = build_vlm(spec).eval()
    fill_from_hf(model, HFCheckpoint(hf_dir))
    return MegatronEngine(model, max_seq_len=4096, eos_ids=[], pad_id=0)


def section_rollout(args) -> None:
    import torch

    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.platform import Timer, device, init_model_parallel
    from megatron_papo.rollout import SamplingParams

    init_model_parallel(1, 1)
    z = args.sizes["rollout"]
    with tempfile.TemporaryDirectory() as hf_dir:
        hf = _hf_tiny(hf_dir, z["hidden"], z["layers"], z["vocab"]).to(device())
        engine = _engine(hf_dir)
    for n, prompts in ((8, z["prompts"]), (1, z["prompts"] * 8)):
        ids = torch.randint(0, z["vocab"] - 8, (prompts, z["prompt_len"]), generator=torch.Generator().manual_seed(1))
        new = z["new_tokens"]

        def hf_run(k=new):
            x = ids.to(device())
            return hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                               top_p=1.0, top_k=0, num_return_sequences=n, max_new_tokens=k, min_new_tokens=k,
                               eos_token_id=None, pad_token_id=0)

        def engine_run(k=new):
            return engine.generate([PromptInputs(r.clone(), None, None) for r in ids], n,
                                   SamplingParams(temperature=1.0, max_new_tokens=k), seed=0)

        with torch.no_grad():
            hf_run(2), engine_run(2)                                   # one-time costs out of the timing
            with Timer() as t_hf:
                out = hf_run()
            with Timer() as t_en:
                res = engine_run()
        tokens = prompts * n * new
        ok = tuple(out.shape) == (prompts * n, z["prompt_len"] + new) and tuple(res.response_ids.shape) == (
            prompts * n, new)
        ratio = t_hf.seconds / t_en.seconds
        row("2 rollout", f"engine tokens/s, n={n} ({prompts}x{n} rows, {new} new)",
            f"{tokens / t_en.seconds:.0f} (ratio {ratio:.2f})", f"{tokens / t_hf.seconds:.0f} transformers",
            OK if ok else FAIL)


# --- 3: MFU of a 7B-shaped stack, 4: its memory ---------------------------------------------------------------------
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


def _memory_plan_total(cfg):
    """The memory plan's total in bytes for ``cfg`` (training.memory_plan, built elsewhere), or a reason."""
    try:
        from megatron_papo.training import memory_plan
    except ImportError:
        return None, "plan unavailable (training.memory_plan absent)"
    fn = next((getattr(memory_plan, n) for n in ("memory_plan", "plan_memory", "plan") if hasattr(memory_plan, n)),
              None)
    try:
        plan = fn(cfg)
        total = plan.get("total") if isinstance(plan, dict) else getattr(plan, "total_bytes", None) or (
            getattr(plan, "total_gb", 0) * 2**30)
        return float(total), "memory plan"
    except Exception as e:  # noqa: BLE001 - the plan's API may differ; the check still reports the peak
        return None, f"plan unavailable ({type(e).__name__})"


def section_memory(args) -> None:
    from megatron_papo.platform import has_gpu

    gib = 2**30
    if not has_gpu():
        row("4 memory", "peak CUDA memory", "n/a on CPU", "", SKIP)
        return
    if "stack" in STATE:
        peak, est = STATE["stack"]
        note = "" if 0.5 * est <= peak <= 1.5 * est else " (outside +-50% of the estimate)"
        row("4 memory", "7B-shaped stack step: peak", f"{peak / gib:.2f} GiB{note}",
            f"{est / gib:.2f} GiB own estimate", OK)                 # a measurement: the plan is judged by it
    if "rl_peak_bytes" in STATE:
        total, what = _memory_plan_total(STATE["rl_cfg"])
        ref = f"{total / gib:.3f} GiB {what}" if total else what
        row("4 memory", "RL step (tiny VLM): peak", f"{STATE['rl_peak_bytes'] / gib:.3f} GiB", ref, OK)


# --- 5: Transformer Engine -------------------------------------------------------------------------------------
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


# --- 6: graph decode -----------------------------------------------------------------------------------------------
def _graph_runs(z: dict):
    """(seconds, response ids, stats, tokens) of the normal decode, fixed-shape eager and fixed-shape with graphs
    (each timed on its second run: one-time costs and graph captures out of it)."""
    import torch

    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.platform import Timer
    from megatron_papo.rollout import MegatronEngine, SamplingParams

    with tempfile.TemporaryDirectory() as hf_dir:
        _hf_tiny(hf_dir, z["hidden"], z["layers"], z["vocab"])
        model = _engine(hf_dir).model
    num, n = 2 * z["prompts"], 8
    ids = torch.randint(0, z["vocab"] - 8, (num, z["prompt_len"]), generator=torch.Generator().manual_seed(1))
    prompts = [PromptInputs(r.clone(), None, None) for r in ids]
    cap = num * n // 2  # half the rows at once (two groups or more): refills into freed group slots
    budgets = torch.randint(1, z["new_tokens"] + 1, (num * n,), generator=torch.Generator().manual_seed(2))
    out = {}
    for name, kw in (("normal", {}), ("eager", dict(fixed_shape=True, cuda_graphs=False)),
                     ("graph", dict(fixed_shape=True))):
        engine = MegatronEngine(model, max_seq_len=4096, eos_ids=[], pad_id=0, max_rows=cap, **kw)
        engine._layout = _with_budgets(engine._layout, budgets)  # rows end at different lengths: mixed steps
        params = SamplingParams(greedy=True, max_new_tokens=z["new_tokens"])
        with torch.no_grad():
            engine.generate(prompts, n, params, seed=0)
            with Timer() as t:
                res = engine.generate(prompts, n, params, seed=0)
        out[name] = (t.seconds, res.response_ids, dict(engine.last_stats), int(res.lengths.sum()))
    return out


def _with_budgets(layout, budgets):
    """The engine's layout with row r's token budget cut to budgets[r] (as if it sampled EOS there)."""
    import torch

    def budgeted(prompts, n, max_new):
        batch = layout(prompts, n, max_new)
        batch.limits = torch.minimum(batch.limits, budgets)
        return batch

    return budgeted


def section_graph(args) -> None:
    from megatron_papo.platform import device, init_model_parallel
    from megatron_papo.platform.decode_accel import can_capture

    init_model_parallel(1, 1)
    z = args.sizes["rollout"]
    out = _graph_runs(z)
    tokens = out["normal"][3]
    same = (out["eager"][1] == out["normal"][1]).all(-1).float().mean().item()
    row("6 graph", "fixed-shape decode rows = normal decode rows", f"{same:.1%}", ">= 90% (100% on CPU)",
        OK if same >= (0.9 if can_capture(device()) else 1.0) else FAIL)
    for name in ("normal", "eager", "graph"):
        s = out[name][0]
        row("6 graph", f"tokens/s, {name} ({2 * z['prompts']}x8 rows, cap {8 * z['prompts']})", f"{tokens / s:.0f}",
            f"{out['eager'][0] / s:.2f}x fixed-shape eager" if name == "graph" else "")
    mixed = out["normal"][2].get("mixed_steps", 0)
    row("6 graph", "forwards with rows at different steps", mixed, "> 0 (budgets differ)", OK if mixed else FAIL)
    if not can_capture(device()):
        row("6 graph", "graph replay tokens = eager tokens", "no CUDA graphs on this device", "", SKIP)
        return
    st = out["graph"][2]
    row("6 graph", "decode steps replayed from graphs", f"{st.get('graph_steps', 0)} of {st.get('steps', 0)}",
        "all (capture failed: eager fallback)" if not st.get("graph_steps") else "all",
        OK if st.get("graph_steps") == st.get("steps") else FAIL)
    equal = bool((out["graph"][1] == out["eager"][1]).all())
    row("6 graph", "graph replay tokens = eager tokens", "identical" if equal else "differ", "identical",
        OK if equal else FAIL)


# --- driver ---------------------------------------------------------------------------------------------------------
NAMES = {"1": "1 rl", "2": "2 rollout", "3": "3 mfu", "4": "4 memory", "5": "5 te", "6": "6 graph"}
SECTIONS = {"1": section_rl, "2": section_rollout, "3": section_mfu, "4": section_memory, "5": section_te,
            "6": section_graph}
GPU = dict(budget=540, limits={"1": 150, "2": 90, "3": 150, "4": 10, "5": 60, "6": 60},
           sizes={"rollout": dict(hidden=512, layers=8, vocab=32000, prompts=4, prompt_len=256, new_tokens=128),
                  "stack": dict(layers=4, hidden=3584, heads=28, kv_heads=4, ffn=18944, vocab=152064, seq=4096,
                                micro_batch=1, micro_batches=2, steps=3)})
SMOKE = dict(budget=150, limits={"1": 70, "2": 25, "3": 25, "4": 5, "5": 10, "6": 45},
             sizes={"rollout": dict(hidden=64, layers=2, vocab=512, prompts=2, prompt_len=16, new_tokens=8),
                    "stack": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512, seq=64,
                                  micro_batch=2, micro_batches=2, steps=2)})


def print_table(title: str) -> None:
    widths = [max(len(r[i]) for r in ROWS + [("section", "check", "value", "reference", "status")])
              for i in range(5)]
    print(title)
    for r in [("section", "check", "value", "reference", "status")] + ROWS:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def start_watchdog(seconds: float, title: str) -> None:
    """A section stuck inside native code (a hung collective or kernel) never sees SIGALRM: past the budget plus a
    margin, print the table so far and exit non-zero from a thread."""
    import threading

    def fire():
        row("watchdog", "total budget", f"exceeded by {seconds:.0f} s inside native code", "", FAIL)
        print_table(title + " (stopped by the watchdog)")
        sys.stdout.flush()
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="the same sections at toy size on the CPU (CI)")
    p.add_argument("--sections", default="1,2,3,4,5,6", help="comma-separated section numbers (default: all)")
    p.add_argument("--budget-s", type=float, default=None, help="total time limit (default 540 GPU, 150 smoke)")
    p.add_argument("--json", help="also write the table as JSON here")
    p.add_argument("--cpu-reference", metavar="DIR", help=argparse.SUPPRESS)  # section 1's fp32 CPU subprocess
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.cpu_smoke or args.cpu_reference:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""                   # before torch sees the GPU
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (resume comparison)
    import torch

    if args.cpu_reference:
        cpu_reference(args.cpu_reference)
        return 0
    from megatron_papo.platform import has_gpu, init_distributed, set_cpu_threads
    from megatron_papo.platform.gpu import device_name

    if not args.cpu_smoke and not has_gpu():
        print("gpu_check: no GPU visible to torch; run with --cpu-smoke for the CPU dry mode", file=sys.stderr)
        return 2
    mode = SMOKE if args.cpu_smoke else GPU
    args.limits, args.sizes = mode["limits"], mode["sizes"]
    deadline = time.monotonic() + (args.budget_s or mode["budget"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    set_cpu_threads(0)
    start_watchdog((args.budget_s or mode["budget"]) + 60, f"gpu_check on {device_name()}")
    init_distributed()
    t0 = time.monotonic()
    for key in [s.strip() for s in args.sections.split(",") if s.strip()]:
        run_section(NAMES[key], SECTIONS[key], mode["limits"][key], deadline, args)
    title = (f"gpu_check {'--cpu-smoke ' if args.cpu_smoke else ''}on {device_name()}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}, {time.monotonic() - t0:.0f} s")
    print_table(title)
    if args.json:
        json.dump({"title": title, "rows": ROWS}, open(args.json, "w"), indent=1)
    failed = sum(r[4] == FAIL for r in ROWS)
    print(f"{len(ROWS)} checks: {failed} failed, {sum(r[4] == SKIP for r in ROWS)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
