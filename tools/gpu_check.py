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
(gloo, perf_counter timings) in well under two minutes: that is what CI runs. Each section is one module of
tools/gpu_checks/ (rl, rollout, mfu, memory, te, graph; the table and shared helpers in common.py); this file
only parses the command line and runs them.

    make gpu-check                      # installs from .gpu_wheels/ (tools/gpu_wheels.sh) if present, then runs
    python tools/gpu_check.py [--cpu-smoke] [--sections 1,3] [--budget-s 540] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # megatron_papo from this tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # gpu_checks, also under runpy

from gpu_checks.common import FAIL, ROWS, SKIP, print_table, run_section, start_watchdog  # noqa: E402
from gpu_checks.graph import section_graph  # noqa: E402
from gpu_checks.memory import section_memory  # noqa: E402
from gpu_checks.mfu import section_mfu  # noqa: E402
from gpu_checks.rl import cpu_reference, section_rl  # noqa: E402
from gpu_checks.rollout import section_rollout  # noqa: E402
from gpu_checks.te import section_te  # noqa: E402

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
