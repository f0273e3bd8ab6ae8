"""Qwen2.5-VL-3B at its real dimensions on CPU (random weights, bf16): HF -> megatron at TP2 x PP2, logits
checked against transformers, one RL micro-step, measured peak memory next to the memory plan. Not in CI.

Steps (each reports as it goes):
1. a random Hugging Face checkpoint of the 3B architecture (tied embeddings, the case the converter's name map
   alone covered until now) written shard by shard in bf16;
2. ``hf-to-mcore --tp 2 --pp 2`` (four gloo ranks, each reads only its shard);
3. transformers' logits (bf16) on one random image + text against ours at TP2 x PP2 (bf16): max and mean
   |difference| relative to the logits' spread (bf16 rounding differs between the two implementations);
4. one RL micro-step at TP2 x PP2: one packed micro-batch (prompt with a 224 x 224 image + text, two responses)
   through megatron's schedule, forward + backward of the PAPO loss; every rank measures the tensor memory it
   holds (``platform.memory.TensorMemory``: its weights, then everything the step allocates) and prints it next
   to the plan's weights + gradients + activations + logits for this micro-batch. Gradients here are plain
   autograd gradients in bf16 (no DDP: its fp32 buffer would need 15 GB more across the four ranks), so the
   plan's gradient figure is taken at 2 bytes per parameter for the comparison.

Memory: about 8 GB for steps 1-3 (the transformers model, then the four ranks), about 16 GB for step 4. The
script checks the available memory first and stops (exit 2) when it is below ``--min-free-gb``.

  python benchmarks/real_shapes.py [--workdir DIR] [--tokens 192] [--small] [--min-free-gb 16]

``--small``: the same steps on a tiny tied model (seconds; the smoke test in tests/test_real_shapes.py).
Last line: ``ratio=<max over ranks of measured peak / planned>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

IMG_PX = 224


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--tokens", type=int, default=192,
                   help="tokens of the RL micro-batch (two rows of an 81-token prompt)")
    p.add_argument("--small", action="store_true", help="a tiny tied model instead of the 3B (smoke test)")
    p.add_argument("--min-free-gb", type=float, default=16.0, help="stop unless this much memory is available")
    return p.parse_args(argv)


def _spec(small: bool):
    from megatron_papo.models import get_preset

    if small:
        return dataclasses.replace(get_preset("tiny"), name="tiny-tied", num_layers=4, tie_word_embeddings=True,
                                   image_token_id=250, vision_start_token_id=251)
    return get_preset("qwen2.5-vl-3b")


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 1024 ** 2


def write_random_hf(spec, out_dir: str, shard_bytes: int = 2 * 1024 ** 3) -> int:
    """A random bf16 HF checkpoint of ``spec`` written shard by shard (never all tensors in memory)."""
    from safetensors.torch import save_file

    from megatron_papo.convert import hf_config_from_spec, name_map
    from megatron_papo.models import family_of_spec

    os.makedirs(out_dir, exist_ok=True)
    shapes = family_of_spec(spec).mapping().expected_hf_shapes(spec)
    names = sorted({n for e in name_map(spec) for n in e.hf})
    g = torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        fname = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, os.path.join(out_dir, fname), metadata={"format": "pt"})
        shards.append((fname, list(current)))
        current, size = {}, 0

    for name in names:
        shape = shapes[name]
        t = torch.randn(shape, generator=g) * 0.02
        if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
            t = 1.0 + t
        current[name] = t.to(torch.bfloat16)
        size += current[name].numel() * 2
        total += current[name].numel()
        if size >= shard_bytes:
            flush()
    if current:
        flush()
    weight_map = {n: f for f, ns in shards for n in ns}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_from_spec(spec, torch.bfloat16), f, indent=1)
    return total


def _rank_logits(mcore_dir: str, inputs: dict):
    from megatron.core import parallel_state as ps

    from megatron_papo.convert.checkpoint import load_vlm
    from megatron_papo.convert.verify import pipeline_logits

    model = load_vlm(mcore_dir, params_dtype=torch.bfloat16).eval()
    out = pipeline_logits(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"])
    return out if ps.get_tensor_model_parallel_rank() == 0 else None


@torch.no_grad()
def check_logits(hf_dir: str, mcore_dir: str) -> tuple[float, float, float]:
    """(max |diff|, mean |diff|, std of the reference logits), transformers vs ours at TP2 x PP2, both bf16."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.convert.checkpoint import read_checkpoint_meta
    from megatron_papo.convert.launch import run_ranks
    from megatron_papo.convert.verify import random_inputs

    spec, _, _ = read_checkpoint_meta(mcore_dir)
    inputs = random_inputs(spec)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    ids = inputs["input_ids"]
    ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"].bfloat16(),
             image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=(ids == spec.image_token_id).int()).logits
    ref = ref.float()
    del hf
    outs = [o for o in run_ranks(_rank_logits, tp=2, pp=2, args=(mcore_dir, inputs)) if o is not None]
    diff = torch.stack([(o - ref).abs() for o in outs])
    return diff.max().item(), diff.mean().item(), ref.std().item()


def _micro_batch(spec, tokens: int):
    """One packed micro-batch: a prompt with a 224 px image and text, two responses, ``tokens`` in all."""
    from megatron_papo.training.packing import micro_batches
    from megatron_papo.training.sequences import Rows

    g = torch.Generator().manual_seed(1)
    side = IMG_PX // spec.vision.patch_size
    grid = torch.tensor([[1, side, side]])
    image_tokens = side * side // spec.vision.spatial_merge_size ** 2
    text = lambda n: torch.randint(0, min(spec.image_token_id, spec.vision_start_token_id, spec.vocab_size),  # noqa
                                   (n,), generator=g)
    prompt = torch.cat([text(8), torch.tensor([spec.vision_start_token_id] + [spec.image_token_id] * image_tokens),
                        text(8)])
    resp_len = max(1, (tokens - 2 * prompt.numel()) // 2)
    rows = Rows([prompt, prompt], text(2 * resp_len).reshape(2, resp_len), torch.ones(2, resp_len, dtype=torch.bool),
                [(torch.randn(int(grid.prod()), spec.vision.patch_dim, generator=g), grid)] * 2)
    tok = {"old_logp": torch.full((2, resp_len), -5.0), "advantages": torch.tensor([[1.0], [-1.0]]).expand(2, resp_len),
           "ref_logp": torch.full((2, resp_len), -5.0), "mask_logp": torch.full((2, resp_len), -5.0)}
    return micro_batches(rows, 1, 0, max_tokens=tokens, tokens=tok, image_token_id=spec.image_token_id,
                         one_shape=True)


def _rank_step(mcore_dir: str, tokens: int) -> dict:
    """One forward + backward of the PAPO loss on one packed micro-batch; this rank's tensor memory."""
    from megatron.core import parallel_state as ps

    from megatron_papo.algorithms.aggregation import Aggregation
    from megatron_papo.algorithms.policy_loss import PolicyLossInputs, get_policy_loss
    from megatron_papo.config import AlgorithmConfig
    from megatron_papo.convert.checkpoint import load_vlm
    from megatron_papo.platform.memory import TensorMemory, parameter_bytes
    from megatron_papo.training.sequences import response_stats, run_schedule

    model = load_vlm(mcore_dir, params_dtype=torch.bfloat16)
    spec = model.spec
    mbs = _micro_batch(spec, tokens)
    algo, papo = AlgorithmConfig(), get_policy_loss("papo")
    agg = Aggregation("token-mean", float(mbs[0].resp_mask.sum()), 1.0, 1, 1)

    def loss_fn(logits, mb):
        logp, ent = response_stats(logits, mb, 1.0)
        t = mb.tokens
        return papo(PolicyLossInputs(logp=logp, old_logp=t["old_logp"], advantages=t["advantages"],
                                     response_mask=mb.resp_mask, ref_logp=t["ref_logp"], mask_logp=t["mask_logp"],
                                     entropy=ent.detach()), algo, agg)

    mem = TensorMemory()
    mem.count(model.parameters())
    t0 = time.perf_counter()
    with mem:
        out = run_schedule(model, mbs, loss_fn, forward_only=False)
    loss = float(out[0]["loss"]) if out else None
    return {"stage": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
            "weights": parameter_bytes(model), "peak": mem.peak, "held": mem.live, "loss": loss,
            "seconds": time.perf_counter() - t0}


def planned(spec, tokens: int) -> list:
    """The plan's per-stage figures for this micro-step (TP2 x PP2, bf16, recompute off, one micro-batch in
    flight: one prompt per update and one row per prompt make the plan count a single micro-batch)."""
    from megatron_papo.config import load_config
    from megatron_papo.training.memory_plan import plan_memory

    cfg = load_config(None, ["model.params_dtype=bfloat16", "parallel.tensor_model_parallel_size=2",
                             "parallel.pipeline_model_parallel_size=2", f"training.max_tokens_per_micro_batch={tokens}",
                             f"data.max_prompt_length={tokens // 2}", f"rollout.max_new_tokens={tokens // 2}",
                             f"data.max_pixels={IMG_PX * IMG_PX}", f"data.min_pixels={IMG_PX * IMG_PX}",
                             "rollout.n=1", "training.prompts_per_step=1", "training.prompts_per_update=1"])
    return plan_memory(cfg, 1, spec)


def main(argv=None) -> int:
    args = _args(argv)
    free = _available_gb()
    need = 0.5 if args.small else args.min_free_gb
    print(f"available memory {free:.1f} GB (need {need:g}); load average {os.getloadavg()[0]:.2f}", flush=True)
    if free < need:
        print(f"not run: only {free:.1f} GB available, {need:g} GB needed (--min-free-gb)")
        return 2
    spec = _spec(args.small)
    from megatron_papo.convert import hf_to_mcore
    from megatron_papo.convert.launch import run_ranks

    with tempfile.TemporaryDirectory(prefix="real_shapes_", dir=args.workdir) as work:
        hf_dir, mcore_dir = os.path.join(work, "hf"), os.path.join(work, "mcore")
        t0 = time.perf_counter()
        n = write_random_hf(spec, hf_dir)
        print(f"1. random HF checkpoint {spec.name}: {n / 1e9:.3f}B parameters, bf16, tied embeddings "
              f"{spec.tie_word_embeddings} ({time.perf_counter() - t0:.0f} s)", flush=True)
        t0 = time.perf_counter()
        hf_to_mcore(hf_dir, mcore_dir, tp=2, pp=2)
        print(f"2. hf-to-mcore --tp 2 --pp 2 ({time.perf_counter() - t0:.0f} s)", flush=True)
        t0 = time.perf_counter()
        mx, mean, std = check_logits(hf_dir, mcore_dir)
        print(f"3. logits vs transformers (bf16 both): max |diff| {mx:.4f}, mean {mean:.5f}, logits std {std:.4f} "
              f"(max/std {mx / std:.3f}) ({time.perf_counter() - t0:.0f} s)", flush=True)
        t0 = time.perf_counter()
        ranks = run_ranks(_rank_step, tp=2, pp=2, args=(mcore_dir, args.tokens))
        print(f"4. one RL micro-step at TP2 x PP2, {args.tokens} packed tokens ({time.perf_counter() - t0:.0f} s)")
    plan = planned(spec, args.tokens)
    print(f"{'rank':<6}{'stage':>6}{'weights GB':>12}{'peak GB':>9}{'plan GB':>9}{'ratio':>7}{'loss':>10}")
    ratios = []
    for r, res in enumerate(ranks):
        s = plan[res["stage"]]
        want = s.weights * 2 + s.activations + s.logits          # bf16 weights + bf16 gradients + update
        ratios.append(res["peak"] / want)
        loss = f"{res['loss']:.4f}" if res["loss"] is not None else "-"
        print(f"{r:<6}{res['stage']:>6}{res['weights'] / 1e9:>12.3f}{res['peak'] / 1e9:>9.3f}{want / 1e9:>9.3f}"
              f"{ratios[-1]:>7.3f}{loss:>10}")
    print(f"logits max |diff| / std = {mx / std:.4f}")
    print(f"ratio={max(ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
