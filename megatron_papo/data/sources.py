"""Raw data sets -> shard samples: jsonl / parquet rows with embedded or referenced images (``make_shards``).

A row holds a question (``question`` or ``problem``...), an ``answer`` (or ShareGPT ``messages``: the user turn is
the question, the assistant turn the answer), and images under ``images`` (a list) or
``image`` (one). An image is a path (relative to ``image_root``, default the data file's folder), raw bytes, a
base64 string (``data:image/...;base64,`` prefix optional) or a Hugging Face datasets image struct
``{"bytes": ..., "path": ...}``. Other fields are kept in the sample's ``extra``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from PIL import Image

QUESTION_FIELDS = ("question", "problem", "prompt", "query")
IMAGE_FIELDS = ("images", "image")
_IMAGE_TAG = re.compile(r"\s*<image>\s*")
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class RejectedRow(ValueError):
    """A row make_shards cannot turn into a sample; ``reason`` is counted in the summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class RowOptions:
    image_root: Optional[Path] = None
    question_field: Optional[str] = None
    answer_field: str = "answer"
    dataset: Optional[str] = None
    reward: str = "math"
    strip_image_tags: bool = True


def iter_rows(path: str | Path) -> Iterator[dict]:
    """Rows of a ``.jsonl`` or ``.parquet`` file (parquet needs pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the file "
                             f"to jsonl") from None
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
        return
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: unsupported input type {path.suffix!r}; use .jsonl or .parquet")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    yield {"__bad_json__": f"line {lineno}: {exc}"}


def _image_bytes(value, root: Optional[Path]) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise RejectedRow("bad_image", f"unsupported image value of type {type(value).__name__}")
    if value.startswith("data:image/") or (len(value) > 256 and "/" not in value[:64]):
        try:
            return base64.b64decode(value.split(",", 1)[-1], validate=False)
        except (binascii.Error, ValueError) as exc:
            raise RejectedRow("bad_image", f"invalid base64 image ({exc})") from None
    path = Path(value) if root is None or Path(value).is_absolute() else root / value
    if not path.is_file():
        raise RejectedRow("missing_image", str(path))
    return path.read_bytes()


def _checked(data: bytes) -> tuple[bytes, str]:
    """The image bytes (kept as stored) and their extension; rejects what the reader could not decode."""
    if not data:
        raise RejectedRow("bad_image", "empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            image.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise RejectedRow("bad_image", str(exc)) from None
    if fmt not in _PIL_EXT:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "png"
    return data, _PIL_EXT[fmt]


def row_to_sample(row: dict, key: str, opts: RowOptions) -> dict:
    """One input row -> a shard sample (images as validated bytes); raises :class:`RejectedRow`."""
    if "__bad_json__" in row:
        raise RejectedRow("bad_json", row["__bad_json__"])
    row = _from_chat(row, opts)
    fields = (opts.question_field,) if opts.question_field else QUESTION_FIELDS
    qfield = next((f for f in fields if row.get(f) not in (None, "")), None)
    if qfield is None:
        raise RejectedRow("missing_question", f"none of the fields {list(fields)}")
    answer = row.get(opts.answer_field)
    if answer is None or str(answer).strip() == "":
        raise RejectedRow("missing_answer", f"field {opts.answer_field!r}")
    raw_images = next((row[f] for f in IMAGE_FIELDS if row.get(f) is not None), [])
    if not isinstance(raw_images, (list, tuple)):
        raw_images = [raw_images]
    images, exts = [], []
    for value in raw_images:
        data, ext = _checked(_image_bytes(value, opts.image_root))
        images.append(data)
        exts.append(ext)
    question = str(row[qfield])
    if opts.strip_image_tags:
        question = _IMAGE_TAG.sub(" ", question).strip()
    used = {qfield, opts.answer_field, *IMAGE_FIELDS, "dataset", "reward"}
    return {"key": key, "question": question, "answer": str(answer),
            "dataset": opts.dataset or row.get("dataset") or "", "reward": row.get("reward") or opts.reward,
            "images": images, "image_exts": exts,
            "extra": {k: v for k, v in row.items() if k not in used and _jsonable(v)}}


def _from_chat(row: dict, opts: RowOptions) -> dict:
    """ShareGPT rows (``messages``: a user turn holding the question, an assistant turn holding the answer), the
    form of the PAPO evaluation files: the question and answer fields are taken from the turns."""
    turns = row.get("messages")
    fields = (opts.question_field,) if opts.question_field else QUESTION_FIELDS
    if not isinstance(turns, list) or any(row.get(f) not in (None, "") for f in fields):
        return row
    said = lambda role: next((t.get("content") for t in turns if isinstance(t, dict)  # noqa: E731
                              and t.get("role") == role), None)
    out = {k: v for k, v in row.items() if k != "messages"}
    out[fields[0]] = said("user")
    if out.get(opts.answer_field) in (None, ""):
        out[opts.answer_field] = said("assistant")
    return out


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def iter_samples(inputs: Sequence[str | Path], opts: RowOptions, rejected: dict) -> Iterator[dict]:
    """Samples from all input files in order; rejected rows are counted in ``rejected`` by reason."""
    index = 0
    for path in inputs:
        path = Path(path)
        file_opts = RowOptions(**{**opts.__dict__, "image_root": opts.image_root or path.parent,
                                  "dataset": opts.dataset or path.stem})
        for row in iter_rows(path):
            key = f"{_safe(path.stem)}_{index:08d}"
            index += 1
            try:
                yield row_to_sample(row, key, file_opts)
            except RejectedRow as exc:
                rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
                rejected.setdefault("_examples", []).append(f"{path}:{key}: {exc}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)
