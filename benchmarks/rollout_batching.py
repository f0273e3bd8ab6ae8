"""Continuous batching under a row cap against static waves, on a long-tail length mix (CPU).

``--prompts`` prompts of ``--prompt-len`` tokens, ``--n`` samples each, more rows than the cap ``--max-rows``
allows at once. Each row ends at a log-normal length (``--tail-median``, ``--tail-sigma``, capped at
``--new-tokens``), as if it sampled EOS there (the row budgets are set on the engine's layout, as
``rollout_throughput.py``'s tail workload does). Two ways to keep at most ``--max-rows`` rows in flight:

- static waves (baseline): the prompts in chunks of ``max_rows // n``, each chunk a separate ``generate`` call
  (the engine without a cap); a wave runs until its longest row is done, its batch shrinking as rows finish;
- continuous: one ``generate`` call with ``MegatronEngine(max_rows=...)``: when rows finish and a whole prompt
  group's slots are free, the next prompts are prefilled and join the running batch.

Both give the same tokens up to float rounding (counted: a draw within rounding of a sampling boundary may
take the neighbouring token; many differing rows fail the run). The table: wall seconds and process CPU seconds (medians of ``--repeats``,
interleaved; CPU seconds are less inflated by a loaded machine), decode forwards, rows computed by them, of those
rows already finished (computed until compaction dropped them), mean rows per forward (of the cap), tokens/s.
The last line is ``ratio=<continuous tokens/s / static-waves tokens/s>`` (wall clock). ``--smoke``: a tiny
model and workload (the test suite's run). Model: a random Qwen2.5-VL saved by transformers, loaded into the
megatron model (hidden 256, 4 layers, vocab 8000 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch


def _hf_model(out_dir: str, args) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    h, v = args.hidden, args.vocab
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=h, intermediate_size=h * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 256), vocab_size=v,
                         rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12], "rope_theta": 1e6}),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=h,
                           fullatt_block_indexes=[0]),
        image_token_id=v - 1, vision_start_token_id=v - 2, vision_end_token_id=v - 3, video_token_id=v - 4,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(out_dir)


def _model(hf_dir: str):
    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.platform import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(tp=1, pp=1)
    model = build_vlm(spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))).eval()
    fill_from_hf(model, HFCheckpoint(hf_dir))
    return model


def _lengths(args) -> torch.Tensor:
    """Response lengths [P*n]: log-normal around --tail-median tokens, capped at --new-tokens."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(args.prompts * args.n, generator=g)
    return (args.tail_median * torch.exp(args.tail_sigma * z)).round().long().clamp(1, args.new_tokens)


@contextmanager
def _budgets(engine, lengths: torch.Tensor, state: dict):
    """Row budgets: rows of the call starting at sample row ``state['first']`` end at their ``lengths``."""
    layout = engine._layout

    def budgeted(prompts, n, max_new):
        batch = layout(prompts, n, max_new)
        batch.limits = lengths[state["first"]:state["first"] + len(prompts) * n].clone()
        return batch

    engine._layout = budgeted
    try:
        yield
    finally:
        del engine._layout


def _run(engine, prompts, args, lengths, waves: bool):
    """One timed rollout of every prompt: ((wall s, process CPU s), response ids, summed scheduling counts)."""
    from megatron_papo.rollout import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    per = args.max_rows // args.n if waves else len(prompts)
    state, stats, outs = {"first": 0}, {}, []
    t0, c0 = time.perf_counter(), time.process_time()
    with _budgets(engine, lengths, state):
        for i in range(0, len(prompts), per):
            state["first"] = i * args.n
            outs.append(engine.generate(prompts[i:i + per], args.n, params, seed=0, row_offset=i * args.n))
            for k, v in engine.last_stats.items():
                stats[k] = max(stats.get(k, 0), v) if k == "peak_rows" else stats.get(k, 0) + v
    dt = (time.perf_counter() - t0, time.process_time() - c0)
    ids = [row for o in outs for row in o.response_ids.tolist()]
    got = torch.cat([o.lengths for o in outs])
    assert torch.equal(got, lengths), (got, lengths)
    return dt, [r[:int(n)] for r, n in zip(ids, lengths)], stats


def _measure(model, args):
    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.rollout import MegatronEngine

    g = torch.Generator().manual_seed(1)
    prompts = [PromptInputs(torch.randint(10, args.vocab - 10, (args.prompt_len,), generator=g), None, None)
               for _ in range(args.prompts)]
    lengths = _lengths(args)
    engines = {"static waves": MegatronEngine(model, max_seq_len=4096, eos_ids=[], pad_id=0),
               "continuous": MegatronEngine(model, max_seq_len=4096, eos_ids=[], pad_id=0, max_rows=args.max_rows)}
    times, tokens, stats = {k: [] for k in engines}, {}, {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            dt, tokens[name], stats[name] = _run(engine, prompts, args, lengths, waves=name == "static waves")
            times[name].append(dt)
    differ = sum(a != b for a, b in zip(tokens["static waves"], tokens["continuous"]))
    print(f"rows whose sampled tokens differ between the schedules: {differ} of {len(lengths)} (the two schedules' "
          f"batches differ, so do the last bits of their logits: a draw landing within that rounding of a "
          f"cumulative-probability boundary takes the neighbouring token; tests/test_rollout_batching.py pins "
          f"identical tokens where no draw does)")
    assert differ <= max(1, len(lengths) // 50), "continuous batching changed the tokens of many rows"
    medians = {k: tuple(statistics.median(t[i] for t in v) for i in (0, 1)) for k, v in times.items()}
    return medians, stats, int(lengths.sum())


def _print(times, stats, total, args) -> float:
    print(f"long-tail mix: {args.prompts} prompts x n={args.n} = {args.prompts * args.n} rows, cap "
          f"{args.max_rows} rows in flight, lengths log-normal (median {args.tail_median:g}, sigma "
          f"{args.tail_sigma:g}, at most {args.new_tokens}), {total} tokens")
    print(f"{'schedule':<15}{'seconds':>8}{'cpu s':>7}{'forwards':>9}{'rows computed':>14}{'of them done':>13}"
          f"{'rows/forward':>13}{'tokens/s':>9}")
    for name in ("static waves", "continuous"):
        s, (t, cpu) = stats[name], times[name]
        fill = s["row_steps"] / max(s["steps"], 1)
        print(f"{name:<15}{t:>8.2f}{cpu:>7.2f}{s['steps']:>9d}{s['row_steps']:>14d}{s['wasted_row_steps']:>13d}"
              f"{fill:>8.1f} ({fill / args.max_rows:>3.0%}){total / t:>9.1f}")
    cpu_ratio = times["static waves"][1] / times["continuous"][1]
    print(f"process CPU seconds ratio (less inflated by other processes): {cpu_ratio:.3f}")
    return times["static waves"][0] / times["continuous"][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=24, help="distinct prompts (more rows than the cap)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-rows", type=int, default=16, help="rows in flight at most (both schedules)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=192, help="longest response (the length cap)")
    p.add_argument("--tail-median", type=float, default=32.0, help="median response length")
    p.add_argument("--tail-sigma", type=float, default=0.9, help="log-normal sigma of the response lengths")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per schedule, interleaved; median reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    p.add_argument("--smoke", action="store_true", help="tiny model and workload (seconds; the test suite's run)")
    args = p.parse_args()
    if args.smoke:
        args.prompts, args.n, args.max_rows, args.prompt_len, args.new_tokens = 6, 2, 4, 8, 16
        args.tail_median, args.hidden, args.layers, args.vocab, args.repeats = 4.0, 64, 2, 512, 1
    if args.max_rows < args.n:
        raise ValueError(f"--max-rows ({args.max_rows}) must be >= --n ({args.n})")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as hf_dir:
        _hf_model(hf_dir, args)
        times, stats, total = _measure(_model(hf_dir), args)
    print(f"ratio={_print(times, stats, total, args):.3f}")


if __name__ == "__main__":
    main()
