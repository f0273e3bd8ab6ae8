"""Rollout throughput: megatron_papo's engine against transformers ``generate`` on the same weights (CPU).

Workloads (``--workloads``), each timed on both sides, interleaved (HF, engine, HF, ...), median of ``--repeats``:

- ``shared``: ``--prompts`` prompts of ``--prompt-len`` tokens, ``--n`` samples each (the GRPO rollout shape),
  ``--new-tokens`` per row (EOS disabled so every row runs to the end), multinomial sampling at temperature 1.
  transformers expands each prompt to its n rows before prefill (``num_return_sequences``); the engine prefills
  each prompt once and shares its KV cache with the n rows. Its ratio is the headline.
- ``single``: prompts * n distinct prompts, n = 1: plain batched decoding.
- ``tail``: the shared shape with responses that end at log-normal lengths (``--tail-median``, ``--tail-sigma``,
  capped at ``--tail-new-tokens``), as if each row sampled EOS there; transformers keeps finished rows in its
  batch until the longest is done, the engine drops them. Also prints the share of computed decode rows that
  were already finished (static batch vs the engine).

``--profile`` first prints where a decode step's CPU time goes (``rollout_profile.py``), through megatron's
modules with plain and with prepacked matmuls, and for the lean decode step (``rollout/lean_decode.py``, one row).
``--no-lean`` runs the engine's decode steps through megatron's forward instead of the lean step (to compare).

Model: a Qwen2.5-VL with a ~55M-parameter language model (hidden 512, 8 layers, vocab 32000; ~210 MB fp32),
random weights, saved by transformers and loaded into the megatron model with megatron_papo.convert.
Both sides run with the same ``torch.set_num_threads(--threads)`` (default 1: on a shared 2-core machine a
2-thread parallel region waits for whichever thread was preempted, which swamps the small decode matmuls of
either side). Prints a table, then each side's prefill / decode split (``rollout_phases.py``: seconds, prefill
GFLOP/s, decode ms per step; for n = 1 the decode step 2x would need); the last line is
``ratio=<engine tokens/s / transformers tokens/s>`` of the first
workload (the medians).
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


def _engine(hf_dir: str, lean: bool = True):
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
    return MegatronEngine(model, max_seq_len=4096, eos_ids=[], pad_id=0, lean_decode=lean)


def _run_engine(engine, ids, args, lengths=None) -> float:
    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.rollout import SamplingParams

    prompts = [PromptInputs(row.clone(), None, None) for row in ids]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    with _row_budgets(engine, lengths):
        out = engine.generate(prompts, args.n, params, seed=0)
    dt = time.perf_counter() - t0
    want = lengths if lengths is not None else torch.full((ids.shape[0] * args.n,), args.new_tokens)
    assert torch.equal(out.lengths, want), (out.lengths, want)
    return dt


class _RowBudgets:
    """Long-tail mix: row r finishes after lengths[r] tokens (as if it sampled EOS there); counts the rows each
    decode forward computes."""

    def __init__(self, engine, lengths):
        self.engine, self.lengths, self.row_steps = engine, lengths, 0

    def __enter__(self):
        layout, self.decode = self.engine._layout, self.engine.decode_forward

        def budgeted(prompts, n, max_new):
            batch = layout(prompts, n, max_new)
            batch.limits = self.lengths.clone()
            return batch

        def counted(ids, *a, **k):  # the engine's decode step (lean or megatron's forward)
            self.row_steps += ids.shape[0]
            return self.decode(ids, *a, **k)

        if self.lengths is not None:
            self.engine._layout = budgeted
        self.engine.decode_forward = counted
        return self

    def __exit__(self, *exc):
        self.engine.__dict__.pop("_layout", None)
        self.engine.decode_forward = self.decode


def _row_budgets(engine, lengths):
    return _RowBudgets(engine, lengths)


def _tail_lengths(args) -> torch.Tensor:
    """Response lengths [P*n]: log-normal around --tail-median tokens, capped at --new-tokens (RL responses)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(args.prompts * args.n, generator=g)
    return (args.tail_median * torch.exp(args.tail_sigma * z)).round().long().clamp(1, args.new_tokens)


def _row_stopper(lengths, prompt_len):
    """transformers: row r stops after lengths[r] new tokens (it then pads, still computed in the batch)."""
    from transformers import StoppingCriteria

    class RowStopper(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] - prompt_len >= lengths

    return RowStopper()


@torch.no_grad()
def _run_hf_tail(model, ids, args, lengths) -> float:
    from transformers import StoppingCriteriaList

    stop = StoppingCriteriaList([_row_stopper(lengths, ids.shape[1])])
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                   top_p=1.0, top_k=0, num_return_sequences=args.n, max_new_tokens=args.new_tokens,
                   eos_token_id=None, pad_token_id=0, stopping_criteria=stop)
    return time.perf_counter() - t0


def _measure(hf, engine, args, name, lengths=None):
    """Interleaved timed runs (HF, engine, HF, ...), each split into prefill and decode; one table entry."""
    from rollout_phases import engine_prefill, hf_prefill

    ids = _prompts(args)
    runs, cpu, prefill = [], [], ([], [])
    for _ in range(args.repeats):
        c0 = time.process_time()
        with hf_prefill(hf, prefill[0]):
            t_hf = _run_hf(hf, ids, args) if lengths is None else _run_hf_tail(hf, ids, args, lengths)
        c1 = time.process_time()
        with engine_prefill(engine, prefill[1]):
            runs.append((t_hf, _run_engine(engine, ids, args, lengths)))
        cpu.append((c1 - c0, time.process_time() - c1))
    tokens = int(lengths.sum()) if lengths is not None else args.prompts * args.n * args.new_tokens
    med = lambda xs: statistics.median(xs)  # noqa: E731
    phases = {}  # (side, clock) -> (prefill, decode) medians, clock 0 wall, 1 CPU
    for i in (0, 1):
        for clock, totals in enumerate((runs, cpu)):
            pre = [p[clock] for p in prefill[i]]
            phases[i, clock] = (med(pre), med(t[i] - p for t, p in zip(totals, pre)))
    return dict(name=name, args=args, runs=runs, tokens=tokens, lengths=lengths,
                medians=[med(r[i] for r in runs) for i in (0, 1)],
                cpu=[med(r[i] for r in cpu) for i in (0, 1)], phases=phases)


def _tail_waste(engine, ids, args, lengths) -> tuple[float, float]:
    """Share of computed decode rows that were already finished: (static batch, the engine's compaction)."""
    static = len(lengths) * (int(lengths.max()) - 1)  # decode forwards: every row until the longest is done
    needed = int((lengths - 1).sum())
    with _row_budgets(engine, lengths) as counter:
        from megatron_papo.data.prompts import PromptInputs
        from megatron_papo.rollout import SamplingParams

        engine.generate([PromptInputs(r.clone(), None, None) for r in ids], args.n,
                        SamplingParams(max_new_tokens=args.new_tokens), seed=0)
    return 1 - needed / static, 1 - needed / counter.row_steps


def _print_profile(engine, ids, args):
    from rollout_profile import profile_decode

    short = argparse.Namespace(**{**vars(args), "new_tokens": min(args.new_tokens, 24)})
    results, step = [], engine.decode_forward
    for packed, lean in ((False, False), (True, False), (True, True)):  # module hooks see megatron's forward only
        engine.packed_weights = packed
        engine.decode_forward = engine._lean_step if lean and engine.lean_decode else engine._megatron_step
        with profile_decode(engine) as prof:
            _run_engine(engine, ids, short)
        results.append(prof)
    engine.packed_weights, engine.decode_forward = True, step
    print(f"decode step profile (n={args.n}, batch {args.prompts * args.n}, {short.new_tokens} steps; exclusive "
          f"CPU ms per step, share):")
    print(f"  {'part':<56}{'plain matmuls':>18}{'prepacked':>18}{'prepacked, lean':>18}")
    parts = [{c: (ms, sh) for c, ms, sh in r.table()} for r in results]
    for c in sorted(set().union(*parts), key=lambda c: -max(p.get(c, (0.0, 0.0))[0] for p in parts[1:])):
        print(f"  {c:<56}" + "".join(f"{p.get(c, (0.0, 0.0))[0]:>9.2f} {p.get(c, (0.0, 0.0))[1]:>7.1%}"
                                     for p in parts))
    totals = [sum(ms for _, ms, _ in r.table()) for r in results]
    print(f"  {'step total':<56}" + "".join(f"{t:>9.2f} {'':>7}" for t in totals))
    pre = [1e3 * r.prefill_seconds for r in results]
    print(f"  {f'prefill ({args.prompts} prompts x {args.prompt_len} tokens; packing incl.), ms per call':<56}"
          + "".join(f"{t:>9.1f} {'':>7}" for t in pre))


def _print_table(entries, args):
    """Wall-clock seconds and ratio (the headline), and CPU seconds of this process and their ratio (less
    inflated by other processes on a shared machine)."""
    print(f"{'workload':<30}{'backend':<23}{'seconds':>8}{'tokens':>7}{'tokens/s':>9}{'ratio':>7}"
          f"{'cpu s':>7}{'cpu ratio':>10}   runs (s)")
    for e in entries:
        a = e["args"]
        label = f"{e['name']}: {a.prompts} x n={a.n}"
        for i, backend in enumerate(("transformers generate", "megatron_papo engine")):
            t = e["medians"][i]
            each = " ".join(f"{r[i]:.2f}" for r in e["runs"])
            ratio = f"{e['medians'][0] / e['medians'][1]:.2f}x" if i else ""
            cpu_ratio = f"{e['cpu'][0] / e['cpu'][1]:.2f}x" if i else ""
            print(f"{label if i == 0 else '':<30}{backend:<23}{t:>8.2f}{e['tokens']:>7d}{e['tokens'] / t:>9.1f}"
                  f"{ratio:>7}{e['cpu'][i]:>7.2f}{cpu_ratio:>10}   {each}")


def _print_phases(entries, hf):
    """Prefill and decode seconds of each side (medians over the timed runs, wall and CPU), prefill GFLOP/s and
    decode ms per step (CPU); for n = 1, the decode step the engine would need for 2x."""
    from rollout_phases import prefill_gflop

    text = hf.config.text_config
    print("phases (medians): prefill = transformers' first forward / the engine's _prefill (weight packing "
          "included); decode = the rest; GFLOP/s = the plain prefill's FLOPs / prefill CPU s")
    print(f"  {'workload':<12}{'backend':<23}{'prefill s':>10}{'cpu s':>7}{'cpu share':>10}{'GFLOP':>7}"
          f"{'GFLOP/s':>9}{'decode s':>10}{'cpu s':>7}{'cpu ms/step':>12}")
    for e in entries:
        a = e["args"]
        steps = (int(e["lengths"].max()) if e["lengths"] is not None else a.new_tokens) - 1
        rows = (a.prompts * a.n, a.prompts)  # transformers prefills every sample row, the engine each prompt
        for i, backend in enumerate(("transformers generate", "megatron_papo engine")):
            flop = prefill_gflop(text, rows[i], a.prompt_len)
            (pre, dec), (pre_cpu, dec_cpu) = e["phases"][i, 0], e["phases"][i, 1]
            print(f"  {e['name'] if i == 0 else '':<12}{backend:<23}{pre:>10.2f}{pre_cpu:>7.2f}"
                  f"{pre_cpu / e['cpu'][i]:>10.0%}{flop:>7.0f}{flop / pre_cpu:>9.1f}{dec:>10.2f}{dec_cpu:>7.2f}"
                  f"{1e3 * dec_cpu / steps:>12.1f}")
        if a.n == 1:
            target, pre_cpu, dec_cpu = e["cpu"][0] / 2, e["phases"][1, 1][0], e["phases"][1, 1][1]
            print(f"  n=1 at 2.0x (CPU): the engine's call in {target:.2f} s; after its prefill ({pre_cpu:.2f} s) "
                  f"decode gets {target - pre_cpu:.2f} s = {1e3 * (target - pre_cpu) / steps:.1f} ms/step "
                  f"(now {1e3 * dec_cpu / steps:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4, help="distinct prompts of the n=8 workload")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (batch = prompts * n)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per side, interleaved (HF, engine, HF, ...); the median is reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (1: on a shared 2-core machine a 2-thread parallel region "
                        "waits for a preempted thread, which swamps small decode matmuls on either side)")
    p.add_argument("--workloads", default="shared,single,tail",
                   help="comma list of: shared (prompts x n), single (prompts*n prompts, n=1), tail (shared with "
                        "log-normal response lengths); the headline ratio is the first one measured")
    p.add_argument("--tail-new-tokens", type=int, default=256, help="tail workload: longest response (the cap)")
    p.add_argument("--tail-median", type=float, default=48.0, help="tail workload: median response length")
    p.add_argument("--tail-sigma", type=float, default=0.8, help="tail workload: log-normal sigma")
    p.add_argument("--profile", action="store_true",
                   help="also print where a decode step's CPU time goes (plain vs prepacked matmuls, lean step)")
    p.add_argument("--no-lean", action="store_true",
                   help="decode through megatron's forward instead of the lean decode step (rollout/lean_decode)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or set(workloads) - {"shared", "single", "tail"}:
        raise ValueError(f"--workloads: pick from shared, single, tail (got {args.workloads!r})")
    with tempfile.TemporaryDirectory() as hf_dir:
        hf = _hf_model(hf_dir, args)
        engine = _engine(hf_dir, lean=not args.no_lean)
        ids = _prompts(args)
        warm = argparse.Namespace(**{**vars(args), "new_tokens": 4})
        _run_hf(hf, ids[:, :16], warm), _run_engine(engine, ids[:, :16], warm)  # one-time costs out of the timing
        if args.profile:
            _print_profile(engine, ids, args)
        entries, waste = [], None
        for w in workloads:
            if w == "shared":
                entries.append(_measure(hf, engine, args, "n=8 shared prompts" if args.n == 8 else "shared"))
            elif w == "single":
                single = argparse.Namespace(**{**vars(args), "prompts": args.prompts * args.n, "n": 1})
                entries.append(_measure(hf, engine, single, "n=1"))
            else:
                tail = argparse.Namespace(**{**vars(args), "new_tokens": args.tail_new_tokens})
                lengths = _tail_lengths(tail)
                waste = _tail_waste(engine, ids, tail, lengths), lengths
                entries.append(_measure(hf, engine, tail, "long tail", lengths))
    params = sum(t.numel() for t in hf.model.language_model.parameters()) + hf.lm_head.weight.numel()
    print(f"model: {params / 1e6:.1f}M language params ({params * 4 / 2**20:.0f} MiB fp32), torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"prompts of {args.prompt_len} tokens, sampling T=1, median of {args.repeats} interleaved runs; "
          f"{args.new_tokens} new tokens per row (shared, n=1); decode step: "
          f"{'lean (rollout/lean_decode.py)' if engine.lean_decode else 'megatron forward'}")
    if waste is not None:
        (static, compacted), lengths = waste
        print(f"long tail: lengths log-normal(median {args.tail_median:g}, sigma {args.tail_sigma:g}) capped at "
              f"{args.tail_new_tokens}: mean {lengths.float().mean():.0f}, max {int(lengths.max())}; finished rows "
              f"computed: static batch {static:.0%}, engine (compaction) {compacted:.0%} of decode rows")
    _print_table(entries, args)
    _print_phases(entries, hf)
    print(f"ratio={entries[0]['medians'][0] / entries[0]['medians'][1]:.3f}")


if __name__ == "__main__":
    main()
