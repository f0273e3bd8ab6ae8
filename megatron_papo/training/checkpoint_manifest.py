"""``complete.json``: what a finished checkpoint holds, and the check that it still holds it.

Written last by a save (before the rename), it lists every file's size and, unless checksums are off, its CRC32.
A size check catches a cut or grown file; only the checksum catches a file damaged in place at the same size (a
bit flip, a zeroed block from a failing disk or an interrupted copy). That matters: megatron's ``.distcp`` shards
hold the weights and optimizer state as raw tensor bytes, and a damaged shard *loads without an error* (measured
on torch 2.13 / megatron-core 0.16.1: a flipped byte or a zeroed 256-byte block in either shard of the tiny model
loaded silently), so a checksum is the only thing that keeps a damaged checkpoint from being trained on.

The checksums are computed in parallel: rank r reads files r, r + world, ... (sorted by name) and rank 0 gathers
them; verification splits the files the same way and every rank gets the same verdict (so every rank takes the
same checkpoint). Cost: one read of the checkpoint at each save (mostly from the page cache, just written) and one
at resume, at about 1 GB/s per rank for ``zlib.crc32`` (see docs/checkpoint_integrity.md for the figures).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Optional

import torch.distributed as dist

MANIFEST = "complete.json"
REQUIRED = ("metadata.json", "common.pt", ".metadata")
_CHUNK = 16 << 20           # bytes read at a time: checksums stream, whatever the file size


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (this rank's alone when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shared_checksums(path: Path) -> dict[str, int]:
    """CRC32 of every file now in ``path``, each rank reading its share; the full dict on every rank (collective)."""
    rank, world = _rank_world()
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    mine = {name: file_crc32(path / name) for name in names[rank::world]}
    merged: dict[str, int] = {}
    for part in gather_objects(mine):
        merged.update(part)
    return merged


def write_manifest(path: Path, checksums: Optional[dict[str, int]] = None) -> None:
    """Write ``complete.json`` (rank 0): every file's size, and its CRC32 when ``checksums`` is given (files added
    after those were computed, e.g. by ``describe``, are checksummed here)."""
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest: dict = {"files": files}
    if checksums is not None:
        manifest["crc32"] = {name: checksums[name] if name in checksums else file_crc32(path / name)
                             for name in files}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _read_manifest(path: Path):
    """(manifest dict or None when absent, problem or None)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None, None
    try:
        data = json.loads(manifest.read_text())
        data["files"].items()
        return data, None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"{manifest} is unreadable ({exc})"


def _size_problem(path: Path, files: dict) -> Optional[str]:
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes, {size} were written (truncated or altered)"
    return None


def _crc_problem(path: Path, crcs: dict, names: list[str]) -> Optional[str]:
    for name in names:
        got = file_crc32(path / name)
        if got != crcs[name]:
            return (f"{path / name} fails its checksum (crc32 {got:08x}, {crcs[name]:08x} were written): damaged "
                    "in place")
    return None


def verify_checkpoint(path: str | Path, checksums: bool = False) -> Optional[str]:
    """None for a complete checkpoint, else what is wrong (naming the file). Sizes always; with ``checksums`` the
    CRC32 of every file too (when the manifest has them). Checkpoints without a manifest (older runs, hf-to-mcore
    output) are checked for megatron's own files only. Rank-local: see :func:`verify_agreed` for a collective one."""
    return _verify(Path(path), checksums, share=(0, 1))


def verify_agreed(path: str | Path, checksums: bool = True) -> Optional[str]:
    """:func:`verify_checkpoint` as a collective when ``checksums`` (each rank checksums its share of the files,
    every rank returns the same verdict: the first problem by rank); without checksums a rank-local size check."""
    if not checksums:
        return verify_checkpoint(path)
    problems = [p for p in gather_objects(_verify(Path(path), checksums, share=_rank_world())) if p is not None]
    return problems[0] if problems else None


def _verify(path: Path, checksums: bool, share: tuple[int, int]) -> Optional[str]:
    if not path.is_dir():
        return "not a directory"
    for name in REQUIRED:
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"{path / name} is missing or empty"
    manifest, problem = _read_manifest(path)
    if manifest is None:
        return problem
    problem = _size_problem(path, manifest["files"])
    crcs = manifest.get("crc32")
    if problem is None and checksums and isinstance(crcs, dict):
        rank, world = share
        problem = _crc_problem(path, crcs, sorted(n for n in manifest["files"] if n in crcs)[rank::world])
    return problem
