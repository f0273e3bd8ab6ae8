#!/usr/bin/env python
"""Check training checkpoints against their complete.json: every file present, of the size and CRC32 written.

  verify_checkpoint.py PATH [PATH ...] [--sizes-only]

PATH is a step_<N> directory or a checkpoint.dir holding several (each is checked, oldest first). One line per
checkpoint: "ok" or what is wrong, naming the file (a file damaged in place at the same size fails its checksum;
checkpoints written before checksums existed are checked by size). The last line is "<N> ok, <M> damaged". Exit
status 1 when any checkpoint is damaged or none was found. Reads every byte: about 1 s per GB on one core.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="step_<N> directories or checkpoint directories holding them")
    p.add_argument("--sizes-only", action="store_true", help="check sizes only, not the CRC32 (no file is read)")
    return p


def _checkpoints(path: Path) -> list[Path]:
    from megatron_papo.training.checkpoint import list_checkpoints

    found = [p for _, p in list_checkpoints(path)]
    return found or [path]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_papo.training.checkpoint_manifest import verify_checkpoint

    ok = bad = 0
    for given in args.paths:
        for path in _checkpoints(Path(given)):
            problem = verify_checkpoint(path, checksums=not args.sizes_only)
            print(f"{path}: {'ok' if problem is None else problem}", flush=True)
            ok, bad = ok + (problem is None), bad + (problem is not None)
    print(f"{ok} ok, {bad} damaged")
    return 1 if bad or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
