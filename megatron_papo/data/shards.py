"""The shard format: one webdataset ``.tar`` member group per sample; parsing raw groups and writing shards.

Per sample key: ``json`` with ``question`` and ``answer`` (optional ``dataset``, ``reward``; any other field is
kept in ``extra``), images as ``jpg``/``png`` (one) or ``0.jpg``, ``1.png``, ... (several, in order). No image:
a text-only sample. Keys may not contain dots (webdataset splits the extension at the first dot).

Reading is defensive (see ``limits.py``): a member larger than the cap is never read, image sizes are checked from
the header before decoding, a shard cut short (inside a member or at a header) is counted as ``truncated_shard``,
and every per-sample failure is a :class:`BadSample` naming shard, key and reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from PIL import Image

from megatron_papo.data.image_processor import _MAX_ASPECT_RATIO, to_rgb
from megatron_papo.data.limits import DEFAULT_LIMITS, DataLimits, text_field

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
KNOWN_FIELDS = ("question", "answer", "dataset", "reward")
DEFAULT_REWARD = "math"
# skip reasons the reader can count (a transform may add its own, e.g. prompt_too_long)
KNOWN_SKIP_REASONS = ("bad_field", "bad_image", "bad_json", "bad_prompt", "bad_sample", "image_too_large",
                      "member_too_large", "missing_answer", "missing_json", "missing_question", "prompt_too_long",
                      "sample_too_large", "truncated_shard", "unknown_reward")


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


_META = re.compile(r"__[^/]*__($|/)")


def iter_raw_groups(shard: str, max_member_bytes: int = DEFAULT_LIMITS.max_member_bytes) -> Iterator[tuple[str, Any]]:
    """``(key, {ext: bytes})`` per sample of a shard, in file order (plain or compressed tar, streamed).

    A group whose member exceeds ``max_member_bytes`` comes as ``(key, BadSample("member_too_large"))`` without its
    data being read. A shard that is cut short, inside a member or at a header (the tar's end-of-archive blocks
    missing), ends with ``(key, BadSample("truncated_shard"))`` for the sample being read: samples after it are lost.
    """
    key, group = None, {}
    try:
        with open(shard, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                prefix, ext = _split_name(info)
                if prefix is None:
                    continue
                if prefix != key and key is not None:
                    yield key, group
                    group = {}
                key = prefix
                if not isinstance(group, BadSample):
                    group = _add_member(tar, info, ext, group, shard, key, max_member_bytes)
            ended = len(tar.fileobj.read(512)) == 512     # the second zero block of a complete tar
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
        yield _truncated(shard, key, f"unreadable tar ({exc})")
        return
    if not ended and key is not None:
        yield _truncated(shard, key, "the tar ends without its end-of-archive blocks (cut short)")
        return
    if key is not None:
        yield key, group


def _split_name(info: tarfile.TarInfo):
    if not info.isfile() or _META.match(info.name):
        return None, None
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(info.name)


def _add_member(tar, info, ext: str, group: dict, shard: str, key: str, cap: int):
    if cap and info.size > cap:
        return BadSample("member_too_large", shard, key, f"{info.name} is {info.size:,} bytes > "
                                                         f"data.max_member_bytes={cap:,}")
    group[ext.lower()] = tar.extractfile(info).read()
    return group


def _truncated(shard: str, key: Optional[str], why: str):
    where = key or "<start of shard>"
    return where, BadSample("truncated_shard", shard, where, f"{why}; this sample and the rest of the shard lost")


def _image_members(group: dict) -> list[str]:
    single = [e for e in IMAGE_EXTS if e in group]
    numbered = sorted((e for e in group if e.split(".")[0].isdigit() and e.split(".")[-1] in IMAGE_EXTS),
                      key=lambda e: int(e.split(".")[0]))
    return single + numbered


def open_image(data: bytes, limits: DataLimits = DEFAULT_LIMITS) -> Image.Image:
    """The image's header only (PIL opens lazily): size and aspect ratio are checked before any decoding."""
    image = Image.open(io.BytesIO(data))
    w, h = image.size
    if limits.max_image_pixels and w * h > limits.max_image_pixels:
        raise _TooLarge("image_too_large", f"{w}x{h} = {w * h:,} pixels > data.max_image_pixels="
                                           f"{limits.max_image_pixels:,}")
    if min(w, h) < 1 or max(w, h) / min(w, h) > _MAX_ASPECT_RATIO:
        raise ValueError(f"{w}x{h}: aspect ratio beyond {_MAX_ASPECT_RATIO}, which the image processor refuses")
    return image


def decode_image(data: bytes, limits: DataLimits = DEFAULT_LIMITS) -> Image.Image:
    image = open_image(data, limits)
    image.load()  # PIL decodes lazily: force it so corrupt data fails here, not in the image processor
    return to_rgb(image)


class _TooLarge(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _load_meta(shard: str, key: str, raw: bytes) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadSample("bad_json", shard, key, f"not UTF-8 ({exc})") from None
    except (ValueError, RecursionError) as exc:        # JSONDecodeError, digit limit of huge ints, deep nesting
        raise BadSample("bad_json", shard, key, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", shard, key, f"expected an object, got {type(meta).__name__}")
    return meta


def _fields(shard: str, key: str, meta: dict) -> dict:
    out = {}
    for name in ("question", "answer"):
        if meta.get(name) is None:
            raise BadSample(f"missing_{name}", shard, key)
        try:
            out[name] = text_field(meta[name], name)
        except ValueError as exc:
            raise BadSample("bad_field", shard, key, str(exc)) from None
    reward = meta.get("reward") or DEFAULT_REWARD
    if not isinstance(reward, str) or not _reward_known(reward):
        raise BadSample("unknown_reward", shard, key, f"reward {reward!r} is not registered")
    out["reward"] = reward
    return out


def _reward_known(name: str) -> bool:
    from megatron_papo.rewards import REWARDS

    return name.strip().lower() in REWARDS


def _decode_images(shard: str, key: str, group: dict, limits: DataLimits) -> list:
    members = _image_members(group)
    heads, total = [], 0
    try:
        for ext in members:
            if len(group[ext]) == 0:
                raise ValueError(f"{ext} is empty (0 bytes)")
            heads.append(open_image(group[ext], limits))
            total += heads[-1].size[0] * heads[-1].size[1]
        if limits.max_sample_pixels and total > limits.max_sample_pixels:
            raise _TooLarge("sample_too_large", f"{len(heads)} images, {total:,} pixels > data.max_sample_pixels="
                                                f"{limits.max_sample_pixels:,}")
        images = []
        for ext, image in zip(members, heads):
            image.load()
            images.append(to_rgb(image))
        return images
    except _TooLarge as exc:
        raise BadSample(exc.reason, shard, key, str(exc)) from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadSample("bad_image", shard, key, f"{type(exc).__name__}: {exc}") from None


def parse_group(shard: str, key: str, group: dict, limits: DataLimits = DEFAULT_LIMITS) -> dict:
    """Raw members -> a sample dict (see the module docstring); raises :class:`BadSample`."""
    if "json" not in group:
        raise BadSample("missing_json", shard, key, f"members {sorted(group)}")
    meta = _load_meta(shard, key, group["json"])
    fields = _fields(shard, key, meta)
    images = _decode_images(shard, key, group, limits)
    dataset = meta.get("dataset")
    return {"key": key, "shard": shard, **fields,
            "dataset": str(dataset) if isinstance(dataset, (str, int)) and dataset != "" else
            (Path(shard).parent.name or "default"), "images": images,
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


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> int:
    """Refuse an output directory that already holds shards (a reader would mix old and new ones) unless
    ``overwrite``, which deletes those ``.tar`` files first; returns how many were deleted."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; pass a directory")
    old = sorted(out.rglob("*.tar")) if out.is_dir() else []
    if old and not overwrite:
        raise ValueError(f"--out {str(out)!r} already holds {len(old)} .tar shard(s) that readers would mix with "
                         "the new ones; pass --overwrite to delete them first, or choose an empty directory")
    for p in old:
        p.unlink()
    return len(old)


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
