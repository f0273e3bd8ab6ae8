"""Peak extra memory and wall time of the vocab-parallel ops against plain torch, forward + backward.

Computes, per token, log p(target), H(p), log q(target) and the exact KL(p || q) (the PAPO per-token
statistics; p = policy logits with the real image, q = with the masked image) and backpropagates a weighted sum:

  reference   plain torch: log_softmax materialised for p and q, then gather / entropy / KL, autograd backward
  fused       megatron_papo.ops.vocab_parallel_pair_stats: one chunked pass, nothing vocabulary-sized kept
  separate    vocab_parallel_token_stats(p) + vocab_parallel_kl(p, q) + vocab_parallel_log_probs(q): two
              autograd nodes feed p's gradient, so autograd holds a second full gradient while summing them

Each variant runs in a fresh subprocess (TP=1, no process group). "extra" is the peak RSS (ru_maxrss) beyond
what the process held once the logits existed, minus the gradients of the logits (those are the result, not
overhead), as a fraction of one float32 copy of the logits. The last line, ``ratio=<float>``, is that fraction
for the fused path. Time ratios are against the reference measured in the same run.

  python benchmarks/ops_memory.py [--tokens 2048] [--vocab 151936] [--dtype float32] [--q-grad]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("reference", "fused", "separate")


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def _reference(p, q, targets, temperature: float):
    import torch.nn.functional as F

    lp = F.log_softmax(p.float() / temperature, -1)  # (N, V) materialised
    lq = F.log_softmax(q.float() / temperature, -1)
    probs = lp.exp()
    return (lp.gather(-1, targets[:, None])[:, 0], -(probs * lp).sum(-1), lq.gather(-1, targets[:, None])[:, 0],
            (probs * (lp - lq)).sum(-1))


def _fused(p, q, targets, temperature: float):
    from megatron_papo.ops import vocab_parallel_pair_stats

    return tuple(vocab_parallel_pair_stats(p, q, targets, temperature=temperature))


def _separate(p, q, targets, temperature: float):
    from megatron_papo.ops import vocab_parallel_kl, vocab_parallel_log_probs, vocab_parallel_token_stats

    logp, ent = vocab_parallel_token_stats(p, targets, temperature=temperature)
    return logp, ent, vocab_parallel_log_probs(q, targets, temperature=temperature), \
        vocab_parallel_kl(p, q, temperature=temperature)


def _step(fn, p, q, targets, weights, temperature):
    outs = fn(p, q, targets, temperature)
    sum((w * o).sum() for w, o in zip(weights, outs)).backward()
    return outs


def worker(args) -> dict:
    """One variant in this (fresh) process; prints a JSON line with its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    fn = {"reference": _reference, "fused": _fused, "separate": _separate}[args.worker]
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    weights = [torch.randn(args.tokens, generator=g) for _ in range(4)]
    # Warm up code paths and thread pools on a small problem so the measurement sees only the big one.
    small = [torch.randn(8, args.vocab, dtype=dtype, requires_grad=r) for r in (True, args.q_grad)]
    _step(fn, *small, targets[:8], [w[:8] for w in weights], args.temperature)
    del small
    # Built in place so that no temporary copy raises the high-water mark before the measurement.
    p = torch.randn(args.tokens, args.vocab, generator=g, dtype=dtype).mul_(3.0).requires_grad_()
    q = torch.randn(args.tokens, args.vocab, generator=g, dtype=dtype).add_(p.detach()).requires_grad_(args.q_grad)
    base = _rss_kib()
    # The high-water mark so far should be ~base; if it is higher, "extra" below is an upper bound.
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeat):
        p.grad = q.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        _step(fn, p, q, targets, weights, args.temperature)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads_kib = sum(x.grad.numel() * x.grad.element_size() for x in (p, q) if x.grad is not None) / 1024
    logits_fp32_kib = args.tokens * args.vocab * 4 / 1024
    # Clamped at 0: ru_maxrss moves in pages and freed heap can be reused, so a path that allocates almost
    # nothing reads as a few hundred KiB either side of zero.
    extra = max(0.0, peak - base - grads_kib)
    best = min(times)
    return {"variant": args.worker, "time_s": best[0], "cpu_s": best[1], "extra_kib": extra, "peak_kib": peak,
            "base_kib": base, "base_peak_kib": base_peak, "extra_frac": extra / logits_fp32_kib}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens (rows of the logits)")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5: 151936)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--q-grad", action="store_true", help="the masked branch q also gets a gradient")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant (default 1: on 2 shared "
                    "cores, OpenMP barriers in every op would mostly measure the neighbours' load)")
    ap.add_argument("--repeat", type=int, default=2, help="timed forward+backward runs per variant (best kept)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    if "reference" not in variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants must include reference and name only {VARIANTS}")
    gib = args.tokens * args.vocab * 4 / 2**30
    print(f"tokens={args.tokens} vocab={args.vocab} dtype={args.dtype} q_grad={args.q_grad} "
          f"threads={args.threads}; one fp32 logits copy = {gib:.2f} GiB", flush=True)
    rows = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--worker", v, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--dtype", args.dtype, "--temperature", str(args.temperature), "--threads", str(args.threads),
               "--repeat", str(args.repeat)] + ["--q-grad"] * args.q_grad
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[v] = json.loads(out.strip().splitlines()[-1])
        print(f"  ran {v}: {rows[v]['time_s']:.2f} s", flush=True)
    ref = rows["reference"]
    print(f"{'variant':<10} {'time s':>8} {'time/ref':>9} {'cpu s':>7} {'extra GiB':>10} "
          f"{'extra/fp32 logits':>18}")
    for v, r in rows.items():
        print(f"{v:<10} {r['time_s']:>8.2f} {r['time_s'] / ref['time_s']:>9.2f} {r['cpu_s']:>7.2f} "
              f"{r['extra_kib'] / 2**20:>10.3f} {r['extra_frac']:>18.4f}")
    headline = rows.get("fused", ref)
    print(f"ratio={headline['extra_frac']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
