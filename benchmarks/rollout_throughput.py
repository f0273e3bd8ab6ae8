"""Rollout throughput: megatron_papo's engine against transformers ``generate`` on the same weights (CPU).

Both generate the same number of tokens from the same prompts: ``--prompts`` prompts of ``--prompt-len`` tokens,
``--n`` samples each (batch = prompts * n rows, the GRPO rollout shape), ``--new-tokens`` new tokens per row
(EOS disabled so every row runs to the end), multinomial sampling at temperature 1. transformers expands each
prompt to its n rows before prefill (``num_return_sequences``); the engine prefills each prompt once and copies
its KV cache to the n rows. ``--n 1 --prompts 32`` measures plain batched decoding instead.

Model: a Qwen2.5-VL with a ~60M-parameter language model (hidden 512, 8 layers, vocab 32000; ~250 MB fp32),
random weights, saved by transformers and loaded into the megatron model with megatron_papo.convert.
Both sides run with the same ``torch.set_num_threads(--threads)`` (default 1: on a shared 2-core machine a
2-thread parallel region waits for whichever thread was preempted, which swamps the small decode matmuls of
either side). The timed runs alternate HF, engine, HF, ... and each side reports the median of ``--repeats``.
Prints a table; the last line is ``ratio=<engine tokens/s / transformers tokens/s>`` (of the medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def _hf_model(out_dir: str, args):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12], "rope_theta": 1e6}),
        vision_config=dict(depth=1, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=512,
                           fullatt_block_indexes=[0]),
        image_token_id=31999, vision_start_token_id=31998, vision_end_token_id=31997, video_token_id=31996,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out_dir)
    return model


def _prompts(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 31000, (args.prompts, args.prompt_len), generator=g)  # [P, s]


@torch.no_grad()
def _run_hf(model, ids, args) -> float:
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                         top_p=1.0, top_k=0, num_return_sequences=args.n, max_new_tokens=args.new_tokens,
                         min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape == (ids.shape[0] * args.n, ids.shape[1] + args.new_tokens), out.shape
    return dt


def _engine(hf_dir: str):
    import json

    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.platform import init_distributed, init_model_parallel
    from megatron_papo.rollout import MegatronEngine

    init_distributed()
    init_model_parallel(tp=1, pp=1)
    spec = spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    model = build_vlm(spec).eval()
    fill_from_hf(model, HFCheckpoint(hf_dir))
    return MegatronEngine(model, max_seq_len=4096, eos_ids=[], pad_id=0)


def _run_engine(engine, ids, args) -> float:
    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.rollout import SamplingParams

    prompts = [PromptInputs(row.clone(), None, None) for row in ids]
    t0 = time.perf_counter()
    out = engine.generate(prompts, args.n, SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens), seed=0)
    dt = time.perf_counter() - t0
    assert out.response_ids.shape == (ids.shape[0] * args.n, args.new_tokens), out.response_ids.shape
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4, help="distinct prompts")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (batch = prompts * n)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per side, interleaved (HF, engine, HF, ...); the median is reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (1: on a shared 2-core machine a 2-thread parallel region "
                        "waits for a preempted thread, which swamps small decode matmuls on either side)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as hf_dir:
        hf = _hf_model(hf_dir, args)
        engine = _engine(hf_dir)
        ids = _prompts(args)
        warm = argparse.Namespace(**{**vars(args), "new_tokens": 4})
        _run_hf(hf, ids[:, :16], warm), _run_engine(engine, ids[:, :16], warm)  # one-time costs out of the timing
        runs = [(_run_hf(hf, ids, args), _run_engine(engine, ids, args)) for _ in range(args.repeats)]
    t_hf, t_en = (statistics.median(r[i] for r in runs) for i in (0, 1))
    tokens = args.prompts * args.n * args.new_tokens
    params = sum(t.numel() for t in hf.model.language_model.parameters()) + hf.lm_head.weight.numel()
    print(f"model: {params / 1e6:.1f}M language params ({params * 4 / 2**20:.0f} MiB fp32), torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"workload: {args.prompts} prompts x n={args.n} = batch {args.prompts * args.n}, prompt {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens per row, sampling T=1; median of {args.repeats} runs")
    print(f"{'backend':<28}{'seconds':>10}{'new tokens':>12}{'tokens/s':>11}   runs (s)")
    for i, (name, t) in enumerate((("transformers generate", t_hf), ("megatron_papo engine", t_en))):
        each = " ".join(f"{r[i]:.2f}" for r in runs)
        print(f"{name:<28}{t:>10.2f}{tokens:>12d}{tokens / t:>11.1f}   {each}")
    print(f"ratio={t_hf / t_en:.3f}")


if __name__ == "__main__":
    main()
