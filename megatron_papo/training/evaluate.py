"""``megatron-papo evaluate``: avg@k accuracy per data set of a training or converted checkpoint.

Each question is answered k times (sampled with the rollout engine at the given temperature) and graded by the
reward the sample names (``reward`` field, the registry of :mod:`megatron_papo.rewards`); avg@k of a data set is
the mean accuracy over its questions and their k answers. Data sets are told apart by the samples' ``dataset``
field. Runs on one process, or under torchrun with the world size as the tensor-parallel size.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist


PROMPTS_PER_BATCH = 16


def iter_samples(spec: str, limit: int) -> Iterator[dict]:
    """Every good sample of the shards once, in shard order (bad ones are skipped, as in training)."""
    from megatron_papo.data import resolve_shards
    from megatron_papo.data.reader import decode_sample
    from megatron_papo.data.shards import BadSample, iter_raw_groups

    count = 0
    for shard in resolve_shards(spec, field="--data"):
        for key, group in iter_raw_groups(shard):
            try:
                sample = decode_sample(shard, key, group)
            except BadSample as bad:
                print(f"skipped: {bad}", file=sys.stderr)
                continue
            yield sample
            count += 1
            if limit and count >= limit:
                return


def _batches(it: Iterator[dict], size: int) -> Iterator[list]:
    batch = []
    for s in it:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate(model, tokenizer, processor, samples: Iterator[dict], k: int, params, seed: int = 0,
             max_prompt_length: int = 4096) -> dict:
    """avg@k per data set: ``{dataset: {"questions", "samples", "avg@k"}}`` plus ``"overall"``."""
    from megatron_papo.data import encode_prompt
    from megatron_papo.rewards import get_reward
    from megatron_papo.rollout import MegatronEngine

    engine = MegatronEngine(model, max_seq_len=max_prompt_length + params.max_new_tokens, tokenizer=tokenizer)
    acc, questions = defaultdict(float), defaultdict(int)
    for b, batch in enumerate(_batches(samples, PROMPTS_PER_BATCH)):
        prompts = [encode_prompt(tokenizer, processor, s["question"], s["images"]) for s in batch]
        out = engine.generate(prompts, k, params, seed=seed * 1_000_003 + b)
        for i in range(len(out)):
            s = batch[i // k]
            text = tokenizer.decode(out.response_ids[i][out.response_mask[i]].tolist())
            acc[s["dataset"]] += float(get_reward(s.get("reward"))(text, s["answer"])["accuracy"])
        for s in batch:
            questions[s["dataset"]] += 1
    result = {d: {"questions": questions[d], "samples": questions[d] * k, "avg@k": acc[d] / (questions[d] * k)}
              for d in sorted(questions)}
    total = sum(questions.values())
    result["overall"] = {"questions": total, "samples": total * k,
                         "avg@k": sum(acc.values()) / max(total * k, 1)}
    return result


def format_table(result: dict, k: int) -> str:
    width = max([len("dataset")] + [len(d) for d in result])
    lines = [f"{'dataset':<{width}}  questions  avg@{k}"]
    for d, r in result.items():
        lines.append(f"{d:<{width}}  {r['questions']:>9}  {r['avg@k']:.4f}")
    return "\n".join(lines)


def evaluate_command(args) -> int:
    from megatron_papo.platform import init_distributed, init_model_parallel, shutdown
    from megatron_papo.rollout import SamplingParams
    from megatron_papo.training.loading import check_checkpoint, load_for_inference

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_checkpoint(args.checkpoint)
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    info = init_distributed()
    init_model_parallel(tp=info.world_size, pp=1, seed=0)
    try:
        loaded = load_for_inference(args.checkpoint)
        with torch.no_grad():
            result = evaluate(loaded.model, loaded.tokenizer, loaded.processor, iter_samples(args.data, args.limit),
                              args.k, params, seed=loaded.seed)
        if info.rank == 0:
            print(f"checkpoint {loaded.path}, k={args.k}, temperature={args.temperature}")
            print(format_table(result, args.k))
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"checkpoint": str(loaded.path), "k": args.k,
                                                      "temperature": args.temperature, "datasets": result},
                                                     indent=1))
                print(f"results: {args.out}")
    finally:
        if dist.is_initialized():
            shutdown()
    return 0
