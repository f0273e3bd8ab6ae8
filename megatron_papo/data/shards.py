"""The shard format: one webdataset ``.tar`` member group per sample; parsing raw groups and writing shards.

Per sample key: ``json`` with ``question`` and ``answer`` (optional ``dataset``, ``reward``; any other field is
kept in ``extra``), images as ``jpg``/``png`` (one) or ``0.jpg``, ``1.png``, ... (several, in order). No image:
a text-only sample. Keys may not contain dots (webdataset splits the extension at the first dot).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from PIL import Image

from megatron_papo.data.image_processor import to_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
KNOWN_FIELDS = ("question", "answer", "dataset", "reward")
DEFAULT_REWARD = "math"


class BadSample(Exception):
    """A sample the reader skips; ``reason`` is the counter name, ``key`` and ``shard`` say where."""

    def __init__(self, reason: str, shard: str, key: str, detail: str = ""):
        super().__init__(f"{shard}: sample {key!r}: {reason}{': ' + detail if detail else ''}")
        self.reason, self.shard, self.key, self.detail = reason, shard, key, detail


class SkipSample(Exception):
    """Raised by a reader ``transform`` to drop a sample; counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def iter_raw_groups(shard: str) -> Iterator[tuple[str, Any]]:
    """``(key, {ext: bytes})`` per sample of a shard, in file order, via webdataset's tar iterator.

    A truncated or unreadable shard ends with one ``(key, BadSample("truncated_shard"))`` item naming the sample
    that was being read, so the loss is counted; samples after it cannot be recovered.
    """
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    key, group = None, {}
    try:
        with open(shard, "rb") as stream:
            for member in tar_file_iterator(stream):
                prefix, ext = base_plus_ext(member["fname"])
                if prefix is None:
                    continue
                if prefix != key and key is not None:
                    yield key, group
                    group = {}
                key = prefix
                group[ext.lower()] = member["data"]
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        yield (key or "<start of shard>"), BadSample("truncated_shard", shard, key or "<start of shard>",
                                                     f"unreadable tar ({exc}); rest of the shard lost")
        return
    if key is not None:
        yield key, group


def _image_members(group: dict) -> list[str]:
    single = [e for e in IMAGE_EXTS if e in group]
    numbered = sorted((e for e in group if e.split(".")[0].isdigit() and e.split(".")[-1] in IMAGE_EXTS),
                      key=lambda e: int(e.split(".")[0]))
    return single + numbered


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # PIL decodes lazily: force it so corrupt data fails here, not in the image processor
    return to_rgb(image)


def parse_group(shard: str, key: str, group: dict) -> dict:
    """Raw members -> a sample dict (see the module docstring); raises :class:`BadSample`."""
    if "json" not in group:
        raise BadSample("missing_json", shard, key, f"members {sorted(group)}")
    try:
        meta = json.loads(group["json"].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadSample("bad_json", shard, key, f"not UTF-8 ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BadSample("bad_json", shard, key, str(exc)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", shard, key, f"expected an object, got {type(meta).__name__}")
    for field in ("question", "answer"):
        value = meta.get(field)
        if value is None or str(value).strip() == "":
            raise BadSample(f"missing_{field}", shard, key)
    images = []
    for ext in _image_members(group):
        if len(group[ext]) == 0:
            raise BadSample("bad_image", shard, key, f"{ext} is empty (0 bytes)")
        try:
            images.append(decode_image(group[ext]))
        except Exception as exc:  # PIL raises many types for corrupt data
            raise BadSample("bad_image", shard, key, f"{ext}: {exc}") from None
    return {"key": key, "shard": shard, "question": str(meta["question"]), "answer": str(meta["answer"]),
            "dataset": str(meta.get("dataset") or Path(shard).parent.name or "default"),
            "reward": str(meta.get("reward") or DEFAULT_REWARD), "images": images,
            "extra": {k: v for k, v in meta.items() if k not in KNOWN_FIELDS}}


def encode_sample(sample: dict, image_format: str = "png") -> dict:
    """A sample dict -> webdataset writer members. Images given as bytes (with ``image_exts``) are kept as is."""
    key = str(sample["key"])
    if "." in key or not key:
        raise ValueError(f"sample key {key!r}: keys must be non-empty and contain no '.' (webdataset splits the "
                         f"file extension at the first dot)")
    meta = {"question": sample["question"], "answer": sample["answer"]}
    for field in ("dataset", "reward"):
        if sample.get(field):
            meta[field] = sample[field]
    meta.update(sample.get("extra") or {})
    out = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    images = sample.get("images") or []
    exts = sample.get("image_exts") or [image_format] * len(images)
    for i, (image, ext) in enumerate(zip(images, exts)):
        name = ext if len(images) == 1 else f"{i}.{ext}"
        out[name] = image if isinstance(image, bytes) else _image_bytes(image, ext)
    return out


def _image_bytes(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG"}.get(ext, ext.upper())
    (to_rgb(image) if fmt == "JPEG" else image).save(buf, format=fmt)
    return buf.getvalue()


class ShardWriter:
    """Writes ``<out_dir>/<prefix>-NNNNNN.tar`` shards of ``samples_per_shard`` samples.

    Each shard is written under a hidden temporary name and renamed when complete, so a crash never leaves a
    half-written shard that a reader would pick up.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", samples_per_shard: int = 1000,
                 image_format: str = "png"):
        if samples_per_shard <= 0:
            raise ValueError(f"samples per shard must be > 0, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.samples_per_shard, self.image_format = prefix, samples_per_shard, image_format
        self.paths: list[str] = []
        self.written = 0
        self._tar = None
        self._count = 0

    def _open(self):
        from webdataset import TarWriter

        final = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self._tmp, self._final = final.with_name(f".{final.name}.tmp"), final
        self._tar = TarWriter(str(self._tmp), encoder=False)
        self._count = 0

    def _close(self):
        self._tar.close()
        os.replace(self._tmp, self._final)
        self.paths.append(str(self._final))
        self._tar = None

    def write(self, sample: dict) -> None:
        members = encode_sample(sample, self.image_format)  # validate before opening a shard
        if self._tar is None:
            self._open()
        self._tar.write(members)
        self._count += 1
        self.written += 1
        if self._count >= self.samples_per_shard:
            self._close()

    def close(self) -> list[str]:
        if self._tar is not None:
            self._close()
        return self.paths

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); completed shards stay."""
        if self._tar is not None:
            self._tar.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, prefix: str = "shard",
                 samples_per_shard: int = 1000, image_format: str = "png",
                 progress: Optional[callable] = None) -> list[str]:
    """Write ``samples`` as shards; returns the shard paths. ``progress(n_written)`` is called per sample."""
    with ShardWriter(out_dir, prefix, samples_per_shard, image_format) as writer:
        for sample in samples:
            writer.write(sample)
            if progress is not None:
                progress(writer.written)
    return writer.paths
