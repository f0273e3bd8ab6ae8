"""The shard tools end to end (called in-process through their main(argv)), and the shard writer's atomicity."""

import base64
import importlib.util
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from megatron_papo.data.reader import ShardReader
from megatron_papo.data.shards import ShardWriter

TOOLS = os.path.join(os.path.dirname(__file__), "..", "tools")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("name", ["make_shards", "make_synthetic_shards", "inspect_shards"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _tool(name)(["--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out


def test_synthetic_then_inspect(tmp_path, capsys):
    out = tmp_path / "syn"
    assert _tool("make_synthetic_shards")(["--out", str(out), "--num-samples", "25", "--samples-per-shard", "10",
                                           "--image-size", "42"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"synthetic-00000{i}.tar" for i in range(3)]
    capsys.readouterr()
    assert _tool("inspect_shards")([str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "25 ok, 0 skipped"
    # a damaged shard next to them: its problems are counted and named
    data = (out / "synthetic-000002.tar").read_bytes()
    (out / "synthetic-000009.tar").write_bytes(data[:len(data) // 2])
    assert _tool("inspect_shards")([str(out / "*.tar")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ok, skipped = (int(x.split()[0]) for x in lines[-1].split(", "))
    assert ok > 25 and skipped == 1 and "truncated_shard" in "\n".join(lines)
    assert _tool("inspect_shards")([str(tmp_path / "missing")]) == 2


def _png_bytes(colour, size=(30, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_make_shards_from_jsonl_and_image_folder(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "red.png").write_bytes(_png_bytes((255, 0, 0)))
    (images / "green.png").write_bytes(_png_bytes((0, 255, 0)))
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [
        {"id": 1, "problem": "<image>What colour?", "answer": "red", "images": ["red.png"], "source": "x"},
        {"problem": "Two pictures <image><image>", "answer": "2", "images": ["red.png", "green.png"]},
        {"question": "Embedded", "answer": "green",
         "image": "data:image/png;base64," + base64.b64encode(_png_bytes((0, 255, 0))).decode()},
        {"question": "Text only: 1+1?", "answer": "2"},
        {"problem": "No answer", "images": ["red.png"]},
        {"problem": "Missing file", "answer": "1", "images": ["nope.png"]},
        {"problem": "Broken file", "answer": "1", "images": ["broken.jpg"]},
    ]
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = tmp_path / "shards"
    assert _tool("make_shards")([str(data), "--out", str(out), "--image-root", str(images),
                                 "--samples-per-shard", "3"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary == (f"wrote 4 samples in 2 shards to {out}; rejected 4 "
                       "(bad_image=1, bad_json=1, missing_answer=1, missing_image=1)")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    reader = ShardReader(str(out), shuffle_buffer=0)
    it = iter(reader)
    got = {s["question"]: s for s in (next(it) for _ in range(4))}
    assert set(got) == {"What colour?", "Two pictures", "Embedded", "Text only: 1+1?"}
    first = got["What colour?"]
    assert first["dataset"] == "set" and first["extra"] == {"id": 1, "source": "x"} and first["reward"] == "math"
    assert np.asarray(first["images"][0])[0, 0].tolist() == [255, 0, 0]
    assert [np.asarray(im)[0, 0].tolist() for im in got["Two pictures"]["images"]] == [[255, 0, 0], [0, 255, 0]]
    assert np.asarray(got["Embedded"]["images"][0])[5, 5].tolist() == [0, 255, 0]
    assert got["Text only: 1+1?"]["images"] == [] and reader.stats == {}


def test_make_shards_parquet(tmp_path, capsys):
    path = tmp_path / "set.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        assert _tool("make_shards")([str(path), "--out", str(tmp_path / "o")]) == 2
        assert "needs pyarrow" in capsys.readouterr().err
        return
    table = pa.table({"problem": ["Colour?"], "answer": ["blue"],
                      "images": [[{"bytes": _png_bytes((0, 0, 255)), "path": None}]]})
    pq.write_table(table, path)
    assert _tool("make_shards")([str(path), "--out", str(tmp_path / "o")]) == 0
    sample = next(iter(ShardReader(str(tmp_path / "o"), shuffle_buffer=0)))
    assert sample["answer"] == "blue" and np.asarray(sample["images"][0])[0, 0].tolist() == [0, 0, 255]


def test_writer_never_leaves_a_half_written_shard(tmp_path):
    from megatron_papo.data.synthetic import make_synthetic_samples

    samples = make_synthetic_samples(5, 0, image_size=42)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, samples_per_shard=2) as writer:
            for i, sample in enumerate(samples):
                if i == 3:
                    raise RuntimeError("crash while writing the second shard")
                writer.write(sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    with pytest.raises(ValueError, match="no '.'"):
        ShardWriter(tmp_path / "x").write({**samples[0], "key": "a.b"})
