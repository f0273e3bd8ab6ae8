"""Shard reader: DP x worker split, seeded order, exact resume, epochs, bad input, shard-list resolution."""

import io
import json
import logging
import os
import tarfile
from collections import Counter

import pytest
from PIL import Image

from megatron_papo.data.reader import ShardReader, resolve_shards
from megatron_papo.data.shards import SkipSample, write_shards
from megatron_papo.data.synthetic import make_synthetic_samples


def _samples(n, seed=0):
    return make_synthetic_samples(n, seed, image_size=42)


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("eight")
    write_shards(_samples(48), out, samples_per_shard=6)  # 8 shards of 6
    return str(out)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    write_shards(_samples(22), out, samples_per_shard=11)  # fewer shards than 4 slots: split by sample
    return str(out)


def _take(reader, n):
    it = iter(reader)
    return [next(it) for _ in range(n)]


def _keys(samples):
    return [s["key"] for s in samples]


@pytest.mark.parametrize("data,per_rank", [("eight_shards", (24, 24)), ("two_shards", (12, 10))])
def test_dp_ranks_and_workers_disjoint_and_complete(data, per_rank, request):
    """2 DP ranks x 2 DataLoader workers: epoch 0 of the four slots is a partition of the data set.
    eight_shards: 2 shards (12 samples) per slot; two_shards (22 samples < 4 slots' shards): sample i goes to
    slot i % 4, so slots get 6, 6, 5, 5 and the round-robin of two equal workers gives 12 and 10 per rank."""
    path = request.getfixturevalue(data)
    per_rank_keys = []
    for rank, n in enumerate(per_rank):
        reader = ShardReader(path, dp_rank=rank, dp_size=2, seed=3, shuffle_buffer=4, num_workers=2)
        keys = _keys(_take(reader, n))
        per_rank_keys.append(keys)
        assert all(st["good"] == n // 2 for st in reader.state_dict()["slots"])  # n/2 from each worker
    flat = [k for keys in per_rank_keys for k in keys]
    total = sum(per_rank)
    assert len(flat) == len(set(flat)) == total
    assert set(flat) == {s["key"] for s in _samples(total)}


def test_same_seed_same_order_other_seed_other_order(eight_shards):
    a = _keys(_take(ShardReader(eight_shards, seed=7, shuffle_buffer=10), 60))
    b = _keys(_take(ShardReader(eight_shards, seed=7, shuffle_buffer=10), 60))
    c = _keys(_take(ShardReader(eight_shards, seed=8, shuffle_buffer=10), 60))
    assert a == b and a != c
    # epoch 0 is the whole set once; epoch 1 starts again in another order
    assert sorted(a[:48]) == sorted(s["key"] for s in _samples(48))
    assert a[48:60] != a[:12]
    unshuffled = _keys(_take(ShardReader(eight_shards, seed=7, shuffle_buffer=0), 6))
    index = [int(k.rsplit("-", 1)[1]) for k in unshuffled]
    assert index == list(range(index[0], index[0] + 6))  # no shuffle: one whole shard in file order


@pytest.mark.parametrize("num_workers,k", [(0, 5), (0, 23), (2, 9), (2, 30)])
def test_stop_and_resume_yields_exactly_the_rest(eight_shards, num_workers, k):
    def reader():
        return ShardReader(eight_shards, dp_rank=1, dp_size=2, seed=11, shuffle_buffer=5, num_workers=num_workers)

    full = _keys(_take(reader(), 40))  # 40 > one epoch of this rank (24): crosses the epoch boundary
    first = reader()
    head = _keys(_take(first, k))
    state = first.state_dict()
    resumed = reader()
    resumed.load_state_dict(state)
    tail = _keys(_take(resumed, 40 - k))
    assert head + tail == full


def test_resume_state_mismatch_is_an_error(eight_shards):
    state = ShardReader(eight_shards, seed=1).state_dict()
    with pytest.raises(ValueError, match="same data settings"):
        ShardReader(eight_shards, seed=2).load_state_dict(state)


# ---- bad input ---------------------------------------------------------------------------------------------

def _png(size=(28, 28), colour=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _good(key, answer="1"):
    return [(f"{key}.json", json.dumps({"question": "q?", "answer": answer}).encode()), (f"{key}.png", _png())]


def _read_all(path, n, caplog):
    reader = ShardReader(path, seed=0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="megatron_papo.data.reader"):
        got = _take(reader, n)
    return _keys(got), reader.stats


BAD_MEMBERS = {
    "bad_image": [("bad.json", json.dumps({"question": "q", "answer": "2"}).encode()),
                  ("bad.png", b"\x89PNG\r\n\x1a\n this is not a png")],
    "zero_byte_image": [("bad.json", json.dumps({"question": "q", "answer": "2"}).encode()), ("bad.jpg", b"")],
    "missing_answer": [("bad.json", json.dumps({"question": "q"}).encode()), ("bad.png", _png())],
    "bad_json": [("bad.json", b'{"question": "caf\xe9", "answer": "1"}'), ("bad.png", _png())],
}
EXPECTED_REASON = {"bad_image": "bad_image", "zero_byte_image": "bad_image", "missing_answer": "missing_answer",
                   "bad_json": "bad_json"}


@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
def test_bad_sample_is_skipped_counted_and_named(tmp_path, caplog, case):
    shard = tmp_path / "s.tar"
    _write_tar(shard, _good("a") + BAD_MEMBERS[case] + _good("c"))
    keys, stats = _read_all(str(shard), 4, caplog)
    assert keys == ["a", "c", "a", "c"]  # two epochs of the good samples, nothing else
    assert stats == Counter({EXPECTED_REASON[case]: 2})
    assert any("bad" in r.getMessage() and str(shard) in r.getMessage() for r in caplog.records)


def test_truncated_tar_counts_the_loss_and_keeps_going(tmp_path, caplog):
    full = tmp_path / "full.tar"
    _write_tar(full, _good("a") + _good("b") + _good("c"))
    data = full.read_bytes()
    cut = tmp_path / "cut.tar"
    with tarfile.open(full) as tar:
        inside_b_image = tar.getmember("b.png").offset_data + 10
    cut.write_bytes(data[:inside_b_image])
    other = tmp_path / "other.tar"
    _write_tar(other, _good("z"))
    keys, stats = _read_all([str(cut), str(other)], 6, caplog)
    assert set(keys) == {"a", "z"} and Counter(keys) == Counter({"a": 3, "z": 3})
    assert stats["truncated_shard"] == 3
    assert any("truncated_shard" in r.getMessage() and "cut.tar" in r.getMessage() and "'b'" in r.getMessage()
               for r in caplog.records)


def test_text_only_and_multi_image_samples(tmp_path, caplog):
    shard = tmp_path / "s.tar"
    meta = json.dumps({"question": "2+2?", "answer": "4", "dataset": "arith", "reward": "choice", "src": 9})
    members = [("t.json", meta.encode()),
               ("m.json", json.dumps({"question": "q", "answer": "1"}).encode()),
               ("m.1.png", _png((28, 56), (0, 0, 255))), ("m.0.png", _png((28, 28), (255, 0, 0)))]
    _write_tar(shard, members)
    reader = ShardReader(str(shard), shuffle_buffer=0)
    t, m = _take(reader, 2)
    assert (t["images"], t["dataset"], t["reward"], t["extra"]) == ([], "arith", "choice", {"src": 9})
    assert [im.size for im in m["images"]] == [(28, 28), (28, 56)]  # ordered by index, not by tar order
    assert m["images"][0].getpixel((0, 0)) == (255, 0, 0) and m["reward"] == "math"
    assert reader.stats == Counter()


def test_all_bad_data_set_fails_at_first_epoch(tmp_path):
    shard = tmp_path / "s.tar"
    _write_tar(shard, BAD_MEMBERS["missing_answer"])
    with pytest.raises(ValueError, match="no readable samples"):
        _take(ShardReader(str(shard)), 1)


def test_transform_skip_is_counted(eight_shards):
    def only_count(sample):
        if sample["extra"]["kind"] != "count":
            raise SkipSample("not_count")
        return sample

    reader = ShardReader(eight_shards, shuffle_buffer=8, transform=only_count)
    got = _take(reader, 24)
    assert all(s["extra"]["kind"] == "count" for s in got)
    assert reader.stats["not_count"] == 24  # the whole epoch was read: 24 count + 24 colour samples


# ---- shard list resolution -----------------------------------------------------------------------------------

def test_resolve_directory_glob_brace(eight_shards):
    shards = resolve_shards(eight_shards)
    assert len(shards) == 8 and shards == sorted(shards)
    assert resolve_shards(os.path.join(eight_shards, "shard-00000[0-3].tar")) == shards[:4]
    assert resolve_shards(os.path.join(eight_shards, "shard-{000002..000004}.tar")) == shards[2:5]
    assert resolve_shards(shards[:2]) == shards[:2]


@pytest.mark.parametrize("kind", ["missing_dir", "empty_dir", "empty_list", "no_glob_match", "brace_missing",
                                  "zero_byte_shards"])
def test_empty_or_missing_data_set_is_a_startup_error(tmp_path, kind):
    spec = {"missing_dir": str(tmp_path / "nope"), "empty_dir": str(tmp_path), "empty_list": [],
            "no_glob_match": str(tmp_path / "*.tar"), "brace_missing": str(tmp_path / "s-{0..2}.tar"),
            "zero_byte_shards": str(tmp_path / "z.tar")}[kind]
    (tmp_path / "z.tar").write_bytes(b"") if kind == "zero_byte_shards" else None
    with pytest.raises(ValueError, match="data.train_shards"):
        ShardReader(spec)


def test_prompt_encoder_filters_long_prompts_with_a_count(tmp_path):
    from megatron_papo.config import TokenizerConfig
    from megatron_papo.data.image_processor import Qwen2VLImageProcessor
    from megatron_papo.data.prompts import PromptEncoder
    from megatron_papo.data.tokenizer import build_tokenizer

    shard_dir = tmp_path / "d"
    samples = _samples(6)
    samples[2]["question"] = "How many shapes are in the image? " * 20  # far longer than the others
    write_shards(samples, shard_dir, samples_per_shard=6)
    tok = build_tokenizer(TokenizerConfig(), cache_dir=tmp_path / "tok")
    proc = Qwen2VLImageProcessor(min_pixels=42 * 42, max_pixels=56 * 56)
    lengths = [len(tok.encode(tok.chat_prompt(s["question"], 1))) + 3 for s in samples]  # 42 px -> 56 px: 1 pad -> 4
    limit = sorted(lengths)[-2]
    reader = ShardReader(str(shard_dir), shuffle_buffer=0, transform=PromptEncoder(tok, proc, limit))
    got = _take(reader, 5)
    assert [s["key"] for s in got] == [s["key"] for i, s in enumerate(samples) if i != 2]
    assert reader.stats == Counter({"prompt_too_long": 1})
    assert all(len(s["prompt"]) <= limit and s["prompt"].pixel_values.shape == (16, 1176) for s in got)
