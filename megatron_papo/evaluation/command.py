"""``megatron-papo evaluate`` and ``megatron-papo compare``: the command-line front ends (argument checks before
any process group starts, the layout, loading, printing, writing)."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import torch.distributed as dist


def layout(world_size: int, tp, pp) -> tuple[int, int, int]:
    """(tp, pp, dp): ``--pp`` defaults to 1, ``--tp`` to the world size / pp (one model over every rank, as
    before data parallelism); the data-parallel size is what remains."""
    from megatron_papo.platform import check_layout

    pp = pp or 1
    tp = tp or max(world_size // pp, 1)
    for flag, v in (("--tp", tp), ("--pp", pp)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if world_size % (tp * pp):
        raise ValueError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the {world_size} processes; launch a "
                         f"multiple of {tp * pp} (torchrun --nproc-per-node / srun --ntasks) or change --tp/--pp")
    return tp, pp, check_layout(world_size, tp, pp)


def evaluate_command(args) -> int:
    from megatron_papo.evaluation.data import load_questions
    from megatron_papo.evaluation.settings import settings_from_args
    from megatron_papo.platform import init_distributed, init_model_parallel, launch_info, shutdown
    from megatron_papo.training.loading import check_checkpoint

    settings = settings_from_args(args)                      # bad flags fail before any process group starts
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: all questions), got {args.limit}")
    read_skips = []
    questions = load_questions(args.data, args.limit or 0, skipped=read_skips)
    check_checkpoint(args.checkpoint)
    tp, pp, dp = layout(launch_info().world_size, args.tp, args.pp)
    info = init_distributed()
    init_model_parallel(tp=tp, pp=pp, seed=settings.seed)
    try:
        result = _run(args, settings, questions, (tp, pp, dp), read_skips)
        if info.rank == 0:
            _print(result, args)
    finally:
        if dist.is_initialized():
            shutdown()
    return 0


def skip_summary(skipped: list) -> dict:
    """``{"count", "by_reason", "samples"}`` of the skipped samples (each with shard, key, reason, detail)."""
    return {"count": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped)), "samples": skipped}


def eval_processor(loaded, settings):
    """(image processor, settings recording its pixel range) for a loaded checkpoint: the checkpoint's family
    decides patch, mean and std; the range is the settings' or the protocol's for that family, else the
    checkpoint's own (``evaluation.settings.processor_pixels``)."""
    from megatron_papo.evaluation.settings import processor_pixels
    from megatron_papo.models import family_of_spec

    family = family_of_spec(getattr(loaded.model, "module", loaded.model).spec)
    lo, hi = processor_pixels(settings, family)
    processor = loaded.processor if lo is None else family.image_processor(lo, hi)
    return processor, dataclasses.replace(settings, min_pixels=processor.min_pixels, max_pixels=processor.max_pixels)


def _run(args, settings, questions: list, tpd: tuple, read_skips: list) -> dict:
    from megatron_papo.evaluation.report import FORMAT_VERSION, TOOL
    from megatron_papo.evaluation.run import evaluate
    from megatron_papo.training.loading import load_for_inference

    loaded = load_for_inference(args.checkpoint)
    processor, settings = eval_processor(loaded, settings)
    t0 = time.perf_counter()
    res = evaluate(loaded.model, loaded.tokenizer, processor, questions, settings, progress=not args.no_progress)
    secs = time.perf_counter() - t0
    answers = len(questions) * settings.k * (3 if settings.perception else 1)
    return {"tool": TOOL, "format_version": FORMAT_VERSION,
            "settings": {**settings.to_dict(), "checkpoint": str(loaded.path), "data": args.data,
                         "limit": args.limit or 0},
            "layout": dict(zip(("tp", "pp", "dp"), tpd)),
            "speed": {"seconds": round(secs, 2), "questions_per_s": len(questions) / secs,
                      "answers_per_s": answers / secs},
            "checkpoint": str(loaded.path), "k": settings.k, "temperature": settings.temperature,
            "datasets": res["datasets"], "skipped": skip_summary(read_skips + res["skipped"]),
            "records": res["records"]}


def _print(result: dict, args) -> None:
    from megatron_papo.evaluation.report import format_table, paper_table, write_result

    s, lay, sp = result["settings"], result["layout"], result["speed"]
    print(f"checkpoint {s['checkpoint']}, k={s['k']}, temperature={s['temperature']}, top_p={s['top_p']}, "
          f"top_k={s['top_k']}, max_new_tokens={s['max_new_tokens']}, seed={s['seed']}"
          + (f", protocol {s['protocol']}" if s["protocol"] else ""))
    print(format_table(result["datasets"], s["k"]))
    paper = paper_table(result["datasets"], s["k"])
    if paper:
        print(paper)
    sk = result["skipped"]
    if sk["count"]:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(sk["by_reason"].items()))
        print(f"skipped {sk['count']} samples ({reasons}); shard and key of each under 'skipped' in the JSON")
    print(f"layout TP={lay['tp']} PP={lay['pp']} DP={lay['dp']}: {sp['seconds']:.1f} s, "
          f"{sp['questions_per_s']:.2f} questions/s, {sp['answers_per_s']:.1f} answers/s")
    if args.out:
        write_result(args.out, result)
        print(f"results: {args.out}")


def compare_command(args) -> int:
    from megatron_papo.evaluation.compare import compare_runs, format_comparison
    from megatron_papo.evaluation.report import load_result, write_result

    if len(args.runs) < 2:
        raise ValueError("compare needs at least two result files (the first is the baseline)")
    if args.resamples < 1:
        raise ValueError(f"--resamples must be >= 1, got {args.resamples}")
    if args.plot:
        from megatron_papo.evaluation.plot import require_matplotlib

        require_matplotlib()
    runs = [load_result(p) for p in args.runs]
    result = compare_runs(runs, list(args.runs), resamples=args.resamples, seed=args.seed)
    print(format_comparison(result))
    if args.out:
        write_result(args.out, result)
        print(f"comparison: {args.out}")
    if args.plot:
        from megatron_papo.evaluation.plot import plot_comparison

        plot_comparison(result, args.plot)
        print(f"chart: {args.plot}")
    return 0
