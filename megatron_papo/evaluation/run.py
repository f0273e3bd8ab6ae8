"""The evaluation loop: k sampled answers per question, graded, one record per question, at any TP x PP x DP.

Questions are split into batches of ``settings.batch_size`` dealt round-robin over the data-parallel ranks
(``evaluation.data.my_chunks``); each rank's model-parallel group answers its batches with the rollout engine
(question i's answers draw from the sampling streams ``i*k .. i*k+k-1`` of ``settings.seed``, so a record is the
same whatever the batch size or layout); records are gathered over the data-parallel ranks and sorted by
question index, so every rank ends with all of them. With ``settings.perception`` each batch is answered again
with the masked and with the blank image (same streams: the views differ only in the pixels, which pairs the
draws and lowers the variance of the reliance), and the real answers are scored for the real-vs-masked KL.
A question whose prompt cannot be encoded (the processor rejects its image, or it is longer than
``max_prompt_length`` tokens) is skipped and recorded with its shard, key and reason, as the training reader
does; the others keep their sampling streams.

Legend: P questions of a batch, k answers each, N = P*k rows (question-major).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_papo.data.prompts import encode_prompt
from megatron_papo.data.shards import BadSample
from megatron_papo.evaluation.data import my_chunks, prepared_images
from megatron_papo.evaluation.metrics import summarize
from megatron_papo.evaluation.perception import blank_images, masked_images, perception_kl, view_prompt
from megatron_papo.rewards import get_reward
from megatron_papo.rollout.pipeline import eval_mode, unwrap
from megatron_papo.training.sequences import Rows


def _dp() -> tuple[int, int, object]:
    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group(with_context_parallel=False))


def evaluate(model, tokenizer, processor, questions: list, settings, *, progress: bool = True,
             max_prompt_length: int = 16384) -> dict:
    """``{"datasets": metrics per data set + "overall", "records": [...], "skipped": [...], "seconds": float}`` on
    every rank (``skipped``: the questions whose prompt could not be encoded, with shard, key and reason).

    ``questions``: samples with ``id``, ``index`` (global, 0..), ``dataset``, ``question``, ``answer``, ``images``
    (``evaluation.data.load_questions``), the same list on every rank.
    """
    from megatron_papo.rollout import MegatronEngine

    dp_rank, dp_size, dp_group = _dp()
    engine = MegatronEngine(model, max_seq_len=max_prompt_length + settings.max_new_tokens, tokenizer=tokenizer,
                            max_rows=settings.max_batch_rows, lean_decode=settings.lean_decode)
    rounds = my_chunks(len(questions), settings.batch_size, dp_rank, dp_size)
    bar = _bar(len(questions), progress)
    t0, records, skipped, dev = time.perf_counter(), [], [], next(model.parameters()).device
    with eval_mode(unwrap(model)):
        for chunk in rounds:
            encoded = [_encode(tokenizer, processor, questions[i], settings, max_prompt_length) for i in chunk]
            skipped += [e for e in encoded if isinstance(e, dict)]
            for run in _consecutive([e for e in encoded if not isinstance(e, dict)]):
                records += _answer_batch(engine, model, tokenizer, processor, run, settings)
            done = torch.tensor([len(chunk)], device=dev)        # collectives on the backend's device
            if dp_size > 1:
                dist.all_reduce(done, group=dp_group)
            if bar is not None:
                bar.update(int(done))
    if bar is not None:
        bar.close()
    records, skipped = _gather(records, dp_size, dp_group), _gather(skipped, dp_size, dp_group)
    return {"datasets": summarize(records, settings.k), "records": records, "skipped": skipped,
            "seconds": time.perf_counter() - t0}


def _encode(tokenizer, processor, q: dict, settings, max_prompt_length: int):
    """``(question, images, prompt)``, or the skip record of a question whose prompt cannot be encoded or is
    longer than ``max_prompt_length`` tokens."""
    try:
        images = prepared_images(q, settings.harness_pixels)
        prompt = encode_prompt(tokenizer, processor, q["question"], images)
    except Exception as exc:  # noqa: BLE001 - a question the processor or template cannot take is a counted skip
        return _skip(q, "bad_prompt", f"{type(exc).__name__}: {exc}")
    if len(prompt) > max_prompt_length:
        return _skip(q, "prompt_too_long", f"{len(prompt)} tokens > max_prompt_length={max_prompt_length}")
    return q, images, prompt


def _skip(q: dict, reason: str, detail: str) -> dict:
    """The skip record (id, index, shard, key, reason, detail), announced on the console as the reader does."""
    bad = BadSample(reason, q.get("shard", "?"), q.get("key", q["id"]), detail)
    if _announces():
        print(f"skipped: {bad}", file=sys.stderr)
    return {"id": q["id"], "index": q["index"], "shard": bad.shard, "key": bad.key, "reason": reason,
            "detail": detail}


def _consecutive(encoded: list) -> list[list]:
    """Runs of consecutive question indices (question i draws streams i*k.., so a skipped one splits a batch)."""
    runs = []
    for e in encoded:
        if runs and runs[-1][-1][0]["index"] + 1 == e[0]["index"]:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _announces() -> bool:
    """One rank of each model-parallel group prints (they all encode the same questions)."""
    return not parallel_state.model_parallel_is_initialized() or parallel_state.get_model_parallel_group().rank() == 0


def _bar(total: int, progress: bool):
    if not progress or (dist.is_initialized() and dist.get_rank() != 0):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluate", unit="question", dynamic_ncols=True)


def _gather(records: list, dp_size: int, group) -> list:
    if dp_size > 1:
        parts = [None] * dp_size
        dist.all_gather_object(parts, records, group=group)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


def _answer_batch(engine, model, tokenizer, processor, encoded: list, settings) -> list:
    """Records of one batch (P encoded questions, consecutive global indices)."""
    batch, images, prompts = (list(x) for x in zip(*encoded))
    first = batch[0]["index"]
    assert all(q["index"] == first + i for i, q in enumerate(batch)), "a batch holds consecutive questions"
    gen = lambda ps: engine.generate(ps, settings.k, settings.sampling(), seed=settings.seed,  # noqa: E731
                                     row_offset=first * settings.k)
    out = gen(prompts)
    records = [_record(q, settings.k, settings.perception) for q in batch]
    _grade(out, batch, tokenizer, records, "correct", settings.k, details=True)
    if settings.perception:
        masked = [view_prompt(p, masked_images(im, settings, q["index"], processor.patch_size), processor)
                  for p, im, q in zip(prompts, images, batch)]
        blank = [view_prompt(p, blank_images(im), processor) for p, im in zip(prompts, images)]
        _grade(gen(masked), batch, tokenizer, records, "correct_masked", settings.k)
        _grade(gen(blank), batch, tokenizer, records, "correct_blank", settings.k)
        _add_kl(model, tokenizer, out, prompts, masked, records, settings)
    return records


def _record(q: dict, k: int, perception: bool) -> dict:
    rec = {"id": q["id"], "index": q["index"], "dataset": q["dataset"], "k": k, "correct": 0, "format": 0,
           "truncated": 0, "tokens": 0}
    if perception:
        rec.update(correct_masked=0, correct_blank=0, kl_sum=0.0, k3_sum=0.0)
    return rec


def _grade(out, batch: list, tokenizer, records: list, key: str, k: int, details: bool = False) -> None:
    for i in range(len(out)):
        q, rec = batch[i // k], records[i // k]
        text = tokenizer.response_text(out.response_ids[i][out.response_mask[i]].tolist())
        score = get_reward(q.get("reward"))(text, q["answer"])
        rec[key] += int(score["accuracy"] > 0.5)
        if details:
            rec["format"] += int(score["format"] > 0.5)
            rec["truncated"] += int(out.finish_reasons[i] == "length")
            rec["tokens"] += int(out.lengths[i])


def _add_kl(model, tokenizer, out, prompts: list, masked: list, records: list, settings) -> None:
    k = settings.k
    rows = Rows([prompts[i // k].input_ids for i in range(len(out))], out.response_ids, out.response_mask.bool(),
                [(prompts[i // k].pixel_values, prompts[i // k].image_grid_thw) for i in range(len(out))])
    views = [(masked[i // k].pixel_values, masked[i // k].image_grid_thw) for i in range(len(out))]
    sums = perception_kl(model, rows, views, tokenizer.pad_id, tokenizer.image_token_id, settings.temperature)
    per_q = sums.view(len(records), k, 3).sum(1)                 # [P, 3]
    for rec, (kl, k3, _) in zip(records, per_q.tolist()):
        rec["kl_sum"], rec["k3_sum"] = kl, k3
