"""The training reader: webdataset shards -> samples, split across DP ranks and workers, exactly resumable.

Work is split into ``dp_size * num_workers`` slots (slot = dp_rank * num_workers + worker). Each epoch the shard
list is permuted with (seed, epoch); with at least as many shards as slots every slot reads its own shards
(shard i of the permutation goes to slot i % num_slots), otherwise every slot streams all shards and keeps the
raw samples whose running index is its own (i % num_slots), so small data sets still split without overlap.

Shuffling is a block shuffle: a slot reads the next ``shuffle_buffer`` raw samples it owns and yields them in a
permutation seeded by (seed, epoch, slot, block). Unlike a rolling shuffle buffer, its state is a few integers
(epoch, shard index, position in that shard, block number, samples taken from the block), so resuming re-reads
at most one block instead of the whole epoch, and yields exactly the samples an uninterrupted run would.
Raw bytes are kept in the block; images are decoded when a sample is yielded.

Bad samples (see ``shards.parse_group``) are skipped with a logged warning naming shard and key and counted in
``stats`` by reason; a slot whose whole epoch yields nothing raises instead of looping forever.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch.utils.data

from megatron_papo.data.limits import DEFAULT_LIMITS, DataLimits
from megatron_papo.data.shards import BadSample, SkipSample, iter_raw_groups, parse_group

log = logging.getLogger(__name__)
_NO_SHUFFLE_BLOCK = 64


def resolve_shards(spec, field: str = "data.train_shards") -> list[str]:
    """Shard paths from a directory, a glob, a brace pattern (``train-{000..009}.tar``), a file, or a list."""
    if isinstance(spec, (list, tuple)):
        paths = [p for s in spec for p in resolve_shards(s, field)]
    elif not spec:
        raise ValueError(f"{field}: no shards given; set it to a directory, glob or brace pattern of .tar files")
    else:
        paths = _resolve_one(str(spec), field)
    if not paths:
        raise ValueError(f"{field}: {spec!r} matches no shards")
    if all(os.path.getsize(p) == 0 for p in paths):
        raise ValueError(f"{field}: all {len(paths)} shards of {spec!r} are empty (0 bytes); rewrite them with "
                         f"tools/make_shards.py")
    return paths


def _resolve_one(spec: str, field: str) -> list[str]:
    if "{" in spec:
        from braceexpand import braceexpand

        paths = list(braceexpand(spec))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{field}: {len(missing)} of {len(paths)} shards of {spec!r} do not exist, e.g. "
                             f"{missing[:3]}")
        return paths
    if any(c in spec for c in "*?["):
        paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not paths:
            raise ValueError(f"{field}: the pattern {spec!r} matches no files")
        return paths
    if os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).rglob("*.tar") if not p.name.startswith("."))
        if not paths:
            raise ValueError(f"{field}: directory {spec!r} holds no .tar shards; make some with "
                             f"tools/make_shards.py or tools/make_synthetic_shards.py")
        return paths
    if os.path.isfile(spec):
        return [spec]
    raise ValueError(f"{field}: {spec!r} does not exist (expected a directory, a glob or a brace pattern of "
                     f".tar shards)")


def decode_sample(shard: str, key: str, group, transform: Optional[Callable] = None,
                  limits: DataLimits = DEFAULT_LIMITS) -> dict:
    """Parse a raw group and apply the reader transform. *Every* per-sample failure becomes a :class:`BadSample`
    naming shard, key and reason, so one hostile sample can only ever be a counted skip (training, evaluation and
    tools/inspect_shards.py all read through here)."""
    if isinstance(group, BadSample):
        raise group
    try:
        sample = parse_group(shard, key, group, limits)
    except BadSample:
        raise
    except Exception as exc:  # noqa: BLE001 - anything a hostile sample provokes in parsing
        raise BadSample("bad_sample", shard, key, f"{type(exc).__name__}: {exc}") from None
    if transform is None:
        return sample
    try:
        return transform(sample)
    except SkipSample as skip:
        raise BadSample(skip.reason, shard, key, str(skip)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. a prompt the image processor or template cannot take
        raise BadSample("bad_prompt", shard, key, f"{type(exc).__name__}: {exc}") from None


@dataclass
class SlotState:
    """Where a slot stands: the start of its current block and how many block entries were consumed."""

    epoch: int = 0
    shard: int = 0  # index into this epoch's shard list (the whole list in sample-split mode)
    pos: int = 0  # raw samples of that shard already read
    seen: int = 0  # raw samples of this epoch read so far (the running index for sample-split ownership)
    block: int = 0  # blocks of this epoch started so far
    taken: int = 0  # entries of the current block yielded or skipped
    good: int = 0  # samples yielded this epoch


class _SlotStream:
    """The infinite, deterministic sample stream of one slot."""

    def __init__(self, shards: Sequence[str], slot: int, num_slots: int, seed: int, block_size: int,
                 shuffle: bool, transform: Optional[Callable], state: Optional[dict] = None,
                 stats: Optional[dict] = None, limits: DataLimits = DEFAULT_LIMITS):
        self.shards, self.slot, self.num_slots, self.seed = list(shards), slot, num_slots, seed
        self.limits = limits
        self.block_size, self.shuffle, self.transform = block_size, shuffle, transform
        self.split_samples = len(self.shards) < num_slots
        self.state = SlotState(**state) if state else SlotState()
        self.stats = Counter(stats or {})
        self._live = None  # ((shard, pos), open raw iterator) left by the last block

    def _epoch_shards(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        ordered = [self.shards[i] for i in order]
        return ordered if self.split_samples else ordered[self.slot::self.num_slots]

    def _raw_iter(self, shard: str, pos: int) -> Iterator:
        # Continue the shard left open by the previous block; open and skip `pos` samples only after a resume.
        if self._live is not None and self._live[0] == (shard, pos):
            return self._live[1]
        return itertools.islice(iter_raw_groups(shard, self.limits.max_member_bytes), pos, None)

    def _read_block(self, st: SlotState) -> tuple[list, SlotState]:
        """The next block of owned raw entries from ``st`` and the state where the following block starts."""
        shards = self._epoch_shards(st.epoch)
        end = SlotState(**asdict(st))
        entries = []
        while len(entries) < self.block_size and end.shard < len(shards):
            shard = shards[end.shard]
            raw = self._raw_iter(shard, end.pos)
            for key, group in raw:
                end.pos, end.seen = end.pos + 1, end.seen + 1
                if not self.split_samples or (end.seen - 1) % self.num_slots == self.slot:
                    entries.append((shard, key, group))
                if len(entries) == self.block_size:
                    self._live = ((shard, end.pos), raw)
                    break
            else:
                end.shard, end.pos = end.shard + 1, 0
        return entries, end

    def _decode(self, shard: str, key: str, group) -> Optional[dict]:
        try:
            return decode_sample(shard, key, group, self.transform, self.limits)
        except BadSample as bad:
            self.stats[bad.reason] += 1
            log.warning("skipped sample: %s (%d %s so far)", bad, self.stats[bad.reason], bad.reason)
        return None

    def __iter__(self) -> Iterator[dict]:
        while True:
            st = self.state
            entries, end = self._read_block(st)
            if not entries:
                if st.good == 0:
                    raise ValueError(f"data: epoch {st.epoch} of slot {self.slot}/{self.num_slots} found no "
                                     f"readable samples in {len(self._epoch_shards(st.epoch))} shards (skipped "
                                     f"so far: {dict(self.stats)}); check the shards with tools/inspect_shards.py")
                self.state = SlotState(epoch=st.epoch + 1)
                continue
            order = (np.random.default_rng([self.seed, st.epoch, self.slot, st.block]).permutation(len(entries))
                     if self.shuffle else np.arange(len(entries)))
            for i in range(st.taken, len(entries)):
                sample = self._decode(*entries[order[i]])
                st.taken = i + 1
                if i + 1 == len(entries):  # block done: the state moves to the next block's start
                    self.state = SlotState(**{**asdict(end), "block": st.block + 1, "taken": 0,
                                              "good": st.good + (sample is not None)})
                if sample is not None:
                    st.good += 1
                    yield sample
            self.state = SlotState(**{**asdict(end), "block": st.block + 1, "taken": 0, "good": st.good})


class _WorkerSlots(torch.utils.data.IterableDataset):
    """torch IterableDataset body: DataLoader worker ``wid`` streams local slot ``(wid + offset) % num_workers``.

    The offset lets a resumed reader continue the round-robin with the worker that was due next.
    """

    def __init__(self, reader: "ShardReader", offset: int):
        self.reader, self.offset = reader, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        local = (info.id + self.offset) % self.reader.num_workers
        stream = self.reader._stream(local)
        for sample in stream:
            yield sample, local, asdict(stream.state), dict(stream.stats)


class ShardReader:
    """Samples of this DP rank, forever across epochs; ``state_dict()`` resumes exactly where it stopped.

    ``num_workers`` > 0 reads in that many DataLoader worker processes (their outputs interleaved round-robin,
    which is deterministic); 0 reads in this process. ``transform(sample) -> sample`` runs where the sample is
    read (in the worker) and may raise :class:`SkipSample` to drop it with a count.
    """

    def __init__(self, shards, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 num_workers: int = 0, transform: Optional[Callable] = None, field: str = "data.train_shards",
                 limits: DataLimits = DEFAULT_LIMITS):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data reader: need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if shuffle_buffer < 0 or num_workers < 0:
            raise ValueError(f"data.shuffle_buffer and data.num_workers must be >= 0, got {shuffle_buffer}, "
                             f"{num_workers}")
        self.shards = resolve_shards(shards, field)
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle_buffer, self.num_workers, self.transform = shuffle_buffer, num_workers, transform
        self.limits = limits
        self._local_slots = max(1, num_workers)
        self.num_slots = dp_size * self._local_slots
        if len(self.shards) < self.num_slots:
            log.warning("%d shards for %d reader slots (dp_size x workers): every slot scans all shards and keeps "
                        "every %d-th sample; write at least %d shards to split by shard", len(self.shards),
                        self.num_slots, self.num_slots, self.num_slots)
        self._states: list[Optional[dict]] = [None] * self._local_slots
        self._stats: list[dict] = [{} for _ in range(self._local_slots)]
        self._next = 0  # local slot due next in the round-robin

    def _stream(self, local: int) -> _SlotStream:
        block = self.shuffle_buffer if self.shuffle_buffer > 0 else _NO_SHUFFLE_BLOCK
        return _SlotStream(self.shards, self.dp_rank * self._local_slots + local, self.num_slots, self.seed, block,
                           self.shuffle_buffer > 0, self.transform, self._states[local], self._stats[local],
                           self.limits)

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            stream = self._stream(0)
            for sample in stream:
                self._states[0], self._stats[0] = asdict(stream.state), dict(stream.stats)
                yield sample
            return
        loader = torch.utils.data.DataLoader(_WorkerSlots(self, self._next), batch_size=None,
                                             num_workers=self.num_workers, collate_fn=_identity,
                                             multiprocessing_context="fork", prefetch_factor=2,
                                             worker_init_fn=_worker_init)
        for sample, local, state, stats in loader:
            self._states[local], self._stats[local] = state, stats
            self._next = (local + 1) % self.num_workers
            yield sample

    @property
    def stats(self) -> Counter:
        """Skipped samples by reason, summed over this rank's workers (as of the samples consumed)."""
        total = Counter()
        for s in self._stats:
            total.update(s)
        return total

    def _fingerprint(self) -> str:
        text = "\n".join([*self.shards, str(self.dp_size), str(self._local_slots), str(self.seed),
                          str(self.shuffle_buffer)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"fingerprint": self._fingerprint(), "dp_rank": self.dp_rank, "next_worker": self._next,
                "slots": [dict(s) if s else None for s in self._states], "stats": [dict(s) for s in self._stats]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint() or state.get("dp_rank") != self.dp_rank:
            raise ValueError("data reader state: saved with other shards, seed, shuffle_buffer, dp_size or "
                             "num_workers (or for another DP rank); resume with the same data settings, or start "
                             "reading afresh by not loading the reader state")
        self._states = [dict(s) if s else None for s in state["slots"]]
        self._stats = [dict(s) for s in state["stats"]]
        self._next = int(state["next_worker"])


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM/SIGUSR1 to the trainer (SLURM signals the whole process group; a worker that
    died of it would break the save the trainer is making) and die with it (torch installs its own SIGTERM
    handler in workers just before this runs)."""
    from megatron_papo.platform.children import ignore_trainer_signals

    ignore_trainer_signals()
