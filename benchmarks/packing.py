"""Sequence packing against padded rows: computed / useful tokens and the time of one RL step's scoring pass
and update, same weights, same rows, measured side by side in one process.

Response lengths follow the published runs' shape, scaled down 8x for the CPU: log-normal with median 400 /
8 = 50 tokens and sigma 0.8 (mean ~69), capped at 2048 / 8 = 256, n = 5 responses per prompt; every prompt is
16 text tokens around one 112 x 112 image (16 image tokens; Qwen2.5-VL's 448 px images give 256 at full scale).
The model is a small Qwen2.5-VL-shaped VLM (4 layers, hidden 256, GQA 4/2 heads, vocabulary 2048: the output
layer is ~8% of the parameters, as at 3B). Per repetition and mode (padded first or packed first, alternating):

- scoring: the real and the masked rows (2N) through megatron's forward-only schedule (the path used at PP > 1
  and with Transformer Engine), padded: ``2 * micro_batch_size`` rows per micro-batch, packed: ``2 * budget``;
- update: forward + backward of a token-mean policy-gradient loss over the N rows (no optimizer step, so the
  weights stay the same), padded: ``micro_batch_size`` rows, packed: ``budget`` tokens per micro-batch.

Padded micro-batches are as long as the step's longest prompt + longest response (one shape per call, as
today); packed ones as long as their rows (PP = 1). "computed (PP>1)" gives the computed tokens when every
packed micro-batch has the budget's length. Log-probs and loss of both modes are compared (max difference
printed). Times are process CPU seconds (1 thread: wall on an idle machine; barely disturbed by other jobs);
the load average is printed. Last line: ``ratio=<median packed step CPU time / median padded>``.

  python benchmarks/packing.py [--prompts 16] [--n 5] [--budget 1024] [--micro-batch-size 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

IMG, VSTART, VEND, PAD = 2000, 2001, 2002, 0


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--n", type=int, default=5, help="responses per prompt")
    p.add_argument("--median", type=float, default=50.0, help="median response length (log-normal)")
    p.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of response lengths")
    p.add_argument("--cap", type=int, default=256, help="longest response (rollout.max_new_tokens)")
    p.add_argument("--budget", type=int, default=1024, help="training.max_tokens_per_micro_batch")
    p.add_argument("--micro-batch-size", type=int, default=4, help="training.micro_batch_size (padded rows)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per mode")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _spec():
    from megatron_papo.models import VisionSpec, VLMSpec

    return VLMSpec(name="bench", num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=768,
                   vocab_size=2048, tie_word_embeddings=False, mrope_section=(8, 12, 12),
                   max_position_embeddings=8192, image_token_id=IMG, vision_start_token_id=VSTART,
                   vision=VisionSpec(depth=2, hidden_size=64, num_heads=2, intermediate_size=128,
                                     out_hidden_size=256, fullatt_block_indexes=(1,)))


def make_rows(args):
    """(real rows, masked rows) of one RL step with log-normal response lengths."""
    import torch

    from megatron_papo.training.sequences import Rows

    g = torch.Generator().manual_seed(args.seed)
    n_rows = args.prompts * args.n
    lengths = torch.exp(torch.randn(n_rows, generator=g) * args.sigma + torch.log(torch.tensor(args.median)))
    lengths = lengths.round().clamp(1, args.cap).long()
    t = int(lengths.max())
    grid = torch.tensor([[1, 8, 8]])                                         # 112 px: 16 merged image tokens
    prompts, images, masked = [], [], []
    for _ in range(args.prompts):
        txt = lambda k: torch.randint(3, 1990, (k,), generator=g).tolist()  # noqa: E731
        prompts.append(torch.tensor(txt(4) + [VSTART] + [IMG] * 16 + [VEND] + txt(12)))
        images.append((torch.randn(64, 1176, generator=g), grid))
        masked.append((torch.randn(64, 1176, generator=g), grid))
    mask = torch.arange(t)[None] < lengths[:, None]
    resp = torch.randint(3, 1990, (n_rows, t), generator=g).masked_fill(~mask, PAD)
    real = Rows([prompts[i // args.n] for i in range(n_rows)], resp, mask,
                [images[i // args.n] for i in range(n_rows)])
    return real, real.with_images([masked[i // args.n] for i in range(n_rows)])


def scoring(model, rows, args, budget):
    from megatron_papo.training.scoring import schedule_logprobs

    return schedule_logprobs(model, rows, 2 * args.micro_batch_size, PAD, IMG, 1.0, max_tokens=2 * budget)


def update(model, rows, args, budget, adv):
    """Forward + backward of a global token-mean policy-gradient loss; returns (loss, micro-batches)."""
    from megatron_papo.algorithms.aggregation import Aggregation, aggregate
    from megatron_papo.training.packing import micro_batches
    from megatron_papo.training.sequences import response_stats, run_schedule

    mbs = micro_batches(rows, args.micro_batch_size, PAD, max_tokens=budget, tokens={"adv": adv},
                        image_token_id=IMG)
    agg = Aggregation("token-mean", float(rows.response_mask.sum()), 1.0, len(mbs), 1)

    def loss_fn(logits, mb):
        logp, _ = response_stats(logits, mb, 1.0)
        loss = aggregate(-logp * mb.tokens["adv"], mb.resp_mask, agg)
        return loss, {"loss": loss.detach() / agg.grad_scale}

    model.zero_grad(set_to_none=True)
    out = run_schedule(model, mbs, loss_fn, forward_only=False)
    return sum(float(o["loss"]) for o in out), mbs


def _init():
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29563").items():
        os.environ.setdefault(k, v)
    from megatron_papo.platform import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(1, 1, 1234)


def main() -> int:
    args = _args()
    import torch

    torch.set_num_threads(args.threads)
    _init()
    from megatron_papo.models import build_vlm
    from megatron_papo.training.packing import micro_batches, packing_efficiency

    model = build_vlm(_spec())
    real, masked = make_rows(args)
    both = real.concat(masked)
    adv = torch.randn(real.response_mask.shape, generator=torch.Generator().manual_seed(1))
    modes = {"padded": 0, "packed": args.budget}
    times = {m: {"scoring": [], "update": [], "step": []} for m in modes}
    results, load = {}, [os.getloadavg()[0]]
    for rep in range(args.repeats):
        for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
            c0 = time.process_time()
            logp = scoring(model, both, args, modes[mode])
            c1 = time.process_time()
            loss, _ = update(model, real, args, modes[mode], adv)
            c2 = time.process_time()
            for k, v in (("scoring", c1 - c0), ("update", c2 - c1), ("step", c2 - c0)):
                times[mode][k].append(v)
            results[mode] = (logp, loss)
            print(f"rep {rep + 1} {mode}: {c2 - c0:.2f} s CPU", file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    lengths = real.response_mask.sum(1).float()
    print(f"rows {len(real)} ({args.prompts} prompts x n={args.n}), response length median "
          f"{lengths.median():.0f} mean {lengths.mean():.1f} max {int(lengths.max())} (log-normal median "
          f"{args.median:g}, sigma {args.sigma:g}, cap {args.cap}); prompt {real.prompt_ids[0].numel()} tokens; "
          f"budget {args.budget}")
    print(f"{'':<22}{'padded':>10}{'packed':>10}{'ratio':>8}")
    for what, rows, mult in (("update", real, 1), ("scoring", both, 2)):
        eff = {m: packing_efficiency(rows, micro_batches(rows, args.micro_batch_size * mult, PAD,
                                                         max_tokens=b * mult, image_token_id=IMG))
               for m, b in modes.items()}
        fixed = len(micro_batches(rows, 1, PAD, max_tokens=args.budget * mult)) * args.budget * mult
        useful = eff["padded"][1]
        print(f"{what + ' computed/useful':<22}{eff['padded'][0] / useful:>10.3f}{eff['packed'][0] / useful:>10.3f}"
              f"{eff['packed'][0] / eff['padded'][0]:>8.3f}")
        print(f"{what + ' (PP>1) c/u':<22}{'':>10}{fixed / useful:>10.3f}")
    for k in ("scoring", "update", "step"):
        a, b = med["padded"][k], med["packed"][k]
        print(f"{k + ' CPU s':<22}{a:>10.3f}{b:>10.3f}{b / a:>8.3f}")
    m = real.response_mask
    diff = ((results["packed"][0] - results["padded"][0]).abs()[both.response_mask]).max().item()
    print(f"max |log-prob packed - padded| {diff:.2e}; loss {results['padded'][1]:.6f} vs "
          f"{results['packed'][1]:.6f} ({int(m.sum())} response tokens)")
    print(f"load average (1 min): {load[0]:.2f} at start, {load[1]:.2f} at end ({os.cpu_count()} cores)")
    print(f"ratio={med['packed']['step'] / med['padded']['step']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
