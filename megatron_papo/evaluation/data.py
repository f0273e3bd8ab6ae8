"""Evaluation questions: every good sample of the shards once, in shard order, with a stable id and its global
index; the split of that fixed list into batches and over data-parallel ranks; the image pre-resize of the
published PAPO evaluation harness.

A question's id is ``<shard folder>/<shard file stem>/<sample key>`` (the same on any machine that holds the same
shards); its global index (its place in the list) keys its sampling streams and its masked image, so records do
not depend on the batch size or the parallel layout.
"""

from __future__ import annotations

import sys
import math
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image


def question_id(sample: dict) -> str:
    shard = Path(sample["shard"])
    return f"{shard.parent.name}/{shard.stem}/{sample['key']}"


def iter_questions(spec: str, limit: int = 0, field: str = "--data",
                   skipped: Optional[list] = None) -> Iterator[dict]:
    """Every good sample of the shards once, in shard order (bad ones are skipped, as in training, and appended to
    ``skipped`` as ``{shard, key, reason, detail}``), each with ``id`` and ``index`` added; at most ``limit``."""
    from megatron_papo.data import resolve_shards
    from megatron_papo.data.reader import decode_sample
    from megatron_papo.data.shards import BadSample, iter_raw_groups

    count = 0
    for shard in resolve_shards(spec, field=field):
        for key, group in iter_raw_groups(shard):
            try:
                sample = decode_sample(shard, key, group)     # the training reader's checks and caps
            except BadSample as bad:
                print(f"skipped: {bad}", file=sys.stderr)
                if skipped is not None:
                    skipped.append({"shard": bad.shard, "key": bad.key, "reason": bad.reason, "detail": bad.detail})
                continue
            sample["id"], sample["index"] = question_id(sample), count
            yield sample
            count += 1
            if limit and count >= limit:
                return


def load_questions(spec: str, limit: int = 0, field: str = "--data", skipped: Optional[list] = None) -> list[dict]:
    """:func:`iter_questions` as a list; an empty result is a one-line error naming the field."""
    questions = list(iter_questions(spec, limit, field, skipped))
    if not questions:
        raise ValueError(f"{field} {spec}: no usable samples (each needs a json with question and answer); "
                         "check the shards with tools/inspect_shards.py")
    return questions


def my_chunks(num_questions: int, batch_size: int, dp_rank: int, dp_size: int) -> list[range]:
    """This rank's batches: consecutive chunks of ``batch_size`` questions dealt round-robin over the ranks.

    Round r holds chunks r*dp .. r*dp+dp-1; a rank without a chunk in the last round gets an empty range, so every
    rank runs the same number of rounds (the progress count is summed once per round).
    """
    chunks = [range(s, min(s + batch_size, num_questions)) for s in range(0, num_questions, batch_size)]
    rounds = -(-len(chunks) // dp_size)
    return [chunks[r * dp_size + dp_rank] if r * dp_size + dp_rank < len(chunks) else range(0)
            for r in range(rounds)]


def harness_resize(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """The PAPO evaluation harness's image step before the processor (LLaMA-Factory's Qwen2-VL plugin): scale
    the area into [min_pixels, max_pixels] keeping the aspect (PIL's default resampling), sides at least 28 px,
    aspect ratio at most 200, RGB."""
    area = image.width * image.height
    if area > max_pixels:
        f = math.sqrt(max_pixels / area)
        image = image.resize((int(image.width * f), int(image.height * f)))
    if image.width * image.height < min_pixels:
        f = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    return image


def prepared_images(sample: dict, harness_pixels: Optional[tuple[int, int]]) -> list[Image.Image]:
    """The sample's images as the model sees them before its processor (harness pre-resize if asked)."""
    if harness_pixels is None:
        return list(sample["images"])
    return [harness_resize(im, *harness_pixels) for im in sample["images"]]
