"""Verifiable synthetic image tasks: answers known by construction, and only visible in the image.

Made for the CPU demo and experiments: small images (56 px -> 2 x 2 merged image tokens at patch 14 and merge 2),
shapes drawn on the 28-px grid of merged image tokens (one shape per token, so one token sees one whole shape), small
counts and one-word answers, so a tiny VLM learns to read them within minutes. Every question text is the same for
all samples of a kind: the answer cannot be guessed from the text (chance: 1/4 for either kind, answers uniform).

Kinds:
- ``count``: 1..4 shapes, each filling its own grid cell; "How many shapes are in the image?" -> "3".
- ``color``: one large shape (a whole cell) and 1..2 small ones (half a cell) in other cells and other colours;
  "What colour is the largest shape?" -> "red".

Earlier versions drew on the 14-px patch grid (count 1..5 in 16 cells, a 2x2-cell shape straddling tokens):
the tiny demo model then learned counting barely above chance and read the image little, so the perception term
of PAPO had almost nothing to act on.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

CELL = 14        # vision patch size in pixels: image sizes are multiples of it
TOKEN_CELL = 28  # one merged image token (patch 14 x spatial merge 2): shapes are laid out on this grid
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
QUESTIONS = {
    "count": "How many shapes are in the image?",
    "color": "What colour is the largest shape?",
}
KINDS = tuple(QUESTIONS)
MAX_COUNT = 4
SHAPES = ("square", "circle", "triangle")


def _draw_shape(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], shape: str, colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _grid(image_size: int) -> tuple[int, int]:
    """(cells per side, cell size in px): the merged-token grid, at least 2 x 2 cells."""
    cells = max(2, image_size // TOKEN_CELL)
    return cells, image_size // cells


def _cell_box(cell: int, cells: int, size: int, frac: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    # A shape of ``frac`` of the cell, placed with a pixel or two of jitter so images are not all identical.
    side = max(4, int(size * frac) - 2 * int(rng.integers(1, 3)))
    slack = size - side
    x0 = (cell % cells) * size + int(rng.integers(0, slack + 1))
    y0 = (cell // cells) * size + int(rng.integers(0, slack + 1))
    return x0, y0, x0 + side - 1, y0 + side - 1


def _count_task(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, str, str]:
    cells, size = _grid(image_size)
    count = int(rng.integers(1, MAX_COUNT + 1))
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    names = list(COLOURS)
    for cell in rng.choice(cells * cells, size=count, replace=False):
        colour = COLOURS[names[int(rng.integers(len(names)))]]
        _draw_shape(draw, _cell_box(int(cell), cells, size, 1.0, rng), SHAPES[int(rng.integers(3))], colour)
    return image, str(count), _SOLUTIONS["count"](str(count))


def _colour_task(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, str, str]:
    cells, size = _grid(image_size)
    names = list(COLOURS)
    order = rng.permutation(len(names))
    big_colour = names[order[0]]
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    num_small = int(rng.integers(1, 3))
    chosen = rng.choice(cells * cells, size=1 + num_small, replace=False)
    _draw_shape(draw, _cell_box(int(chosen[0]), cells, size, 1.0, rng), SHAPES[int(rng.integers(3))],
                COLOURS[big_colour])
    for k, cell in enumerate(chosen[1:]):
        _draw_shape(draw, _cell_box(int(cell), cells, size, 0.5, rng), "square", COLOURS[names[order[1 + k]]])
    return image, big_colour, _SOLUTIONS["color"](big_colour)


# Worked solutions in the PAPO answer format, kept in ``extra["solution"]`` for supervised warm-starts.
_SOLUTIONS = {
    "count": lambda a: f"<think>I count {a} shapes.</think> \\boxed{{{a}}}",
    "color": lambda a: f"<think>The largest shape is {a}.</think> \\boxed{{{a}}}",
}
_ANSWERS = {"count": [str(c) for c in range(1, MAX_COUNT + 1)], "color": list(COLOURS)}
_MAKERS = {"count": _count_task, "color": _colour_task}


def make_synthetic_samples(n: int, seed: int, kinds: Sequence[str] = KINDS, image_size: int = 56) -> list[dict]:
    """``n`` samples in the reader's sample format, cycling through ``kinds``; the same seed gives the same data."""
    return list(iter_synthetic_samples(n, seed, kinds, image_size))


def iter_synthetic_samples(n: int, seed: int, kinds: Sequence[str] = KINDS,
                           image_size: int = 56) -> Iterator[dict]:
    """Lazy form of :func:`make_synthetic_samples` (for large ``n``)."""
    unknown = [k for k in kinds if k not in _MAKERS]
    if unknown or not kinds:
        raise ValueError(f"synthetic kinds: unknown {unknown or 'empty list'}; choose from {list(_MAKERS)}")
    # 3 patches at least, so the processor's grid has 2 x 2 merged tokens and room for MAX_COUNT shapes.
    if image_size % CELL or image_size < 3 * CELL:
        raise ValueError(f"synthetic image_size must be a multiple of {CELL} and at least {3 * CELL}, "
                         f"got {image_size}")
    if n < 0:
        raise ValueError(f"number of synthetic samples must be >= 0, got {n}")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        rng = np.random.default_rng([seed, i])
        image, answer, solution = _MAKERS[kind](rng, image_size)
        yield {"key": f"{kind}-{seed}-{i:07d}", "question": QUESTIONS[kind], "answer": answer,
               "dataset": f"synthetic_{kind}", "reward": "math", "images": [image],
               "extra": {"kind": kind, "solution": solution}}


def synthetic_corpus() -> list[str]:
    """Texts the demo tokenizer is trained on: every question, and the worked solution of every possible answer."""
    texts = list(QUESTIONS.values()) + [str(d) for d in range(10)]
    for kind, answers in _ANSWERS.items():
        texts += [_SOLUTIONS[kind](a) for a in answers]
    return texts


def ensure_synthetic_shards(path: str, n: int, seed: int, kinds: Sequence[str] = KINDS, image_size: int = 56,
                            samples_per_shard: int = 250) -> bool:
    """Write synthetic shards into directory ``path`` unless it already holds ``.tar`` files; True if written.

    Safe when several ranks call it at once: each writes the same deterministic data into its own temporary
    directory and renames it into place; a rank that loses the race discards its copy.
    """
    import os
    import shutil
    from pathlib import Path

    from megatron_papo.data.shards import write_shards

    target = Path(path)
    if target.is_dir() and any(target.rglob("*.tar")):
        return False
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_shards(iter_synthetic_samples(n, seed, kinds, image_size), tmp, "synthetic", samples_per_shard)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True
