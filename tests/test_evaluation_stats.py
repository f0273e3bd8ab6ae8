"""Statistics of `megatron-papo compare` against hand-computed cases and scipy; pairing refusals; the commands'
one-line errors; the paper's table layout, the harness image pre-resize and ShareGPT rows (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megatron_papo.evaluation.stats import (benjamini_hochberg, binom_two_sided, bootstrap_mean_diff, mcnemar,
                                            sign_test)


def test_exact_tests_hand_computed_and_scipy():
    assert binom_two_sided(1, 6) == pytest.approx(2 * (1 + 6) / 64)           # 0.21875
    assert binom_two_sided(3, 6) == 1.0 and binom_two_sided(0, 0) == 1.0
    m = mcnemar([1, 1, 0, 0, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1, 1, 1])         # a only 1, b only 2
    assert (m["a_only"], m["b_only"]) == (1, 2) and m["p"] == pytest.approx(1.0)
    s = sign_test([0.5, 0.25, 1.0, 0.0, 0.5], [0.75, 0.25, 0.5, 0.5, 1.0])
    assert (s["better"], s["worse"], s["ties"]) == (3, 1, 1) and s["p"] == pytest.approx(2 * 5 / 16)
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 10), (3, 17), (40, 100), (260, 500)):
        assert binom_two_sided(k, n) == pytest.approx(scipy_stats.binomtest(k, n).pvalue, rel=1e-9)


def test_bootstrap_hand_computed_and_scipy():
    # two questions, differences 0 and 1: the resampled mean is 0, 1/2, 1 with probability 1/4, 1/2, 1/4
    assert bootstrap_mean_diff([0.0, 1.0], resamples=20_000, seed=1) == (0.0, 1.0)
    assert bootstrap_mean_diff([0.25] * 7) == (0.25, 0.25)
    assert bootstrap_mean_diff([0.1, 0.5, -0.2], seed=3) == bootstrap_mean_diff([0.1, 0.5, -0.2], seed=3)
    # stratified: each stratum keeps its size, so a constant stratum adds no spread
    lo, hi = bootstrap_mean_diff([0.0, 1.0, 0.5, 0.5], strata=[0, 0, 1, 1], resamples=20_000)
    assert (lo, hi) == (0.25, 0.75)
    scipy_stats = pytest.importorskip("scipy.stats")
    d = np.random.default_rng(0).choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=300, p=[.1, .2, .3, .25, .15])
    ref = scipy_stats.bootstrap((d,), np.mean, n_resamples=10_000, method="percentile",
                                random_state=np.random.default_rng(1)).confidence_interval
    lo, hi = bootstrap_mean_diff(d)
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)


def test_benjamini_hochberg_hand_computed_and_scipy():
    got = benjamini_hochberg([0.01, 0.04, 0.03, 0.2])
    assert got == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    scipy_stats = pytest.importorskip("scipy.stats")
    p = np.random.default_rng(2).uniform(0, 0.2, size=9)
    assert benjamini_hochberg(p) == pytest.approx(scipy_stats.false_discovery_control(p).tolist())


def _run(correct, masked=None, k=4, dataset="geo", **settings):
    recs = [{"id": f"s/shard/{i}", "index": i, "dataset": dataset if i % 3 else "logic", "k": k, "correct": c,
             "format": k, "truncated": 0, "tokens": 10 * k} for i, c in enumerate(correct)]
    if masked is not None:
        for r, m in zip(recs, masked):
            r.update(correct_masked=m, correct_blank=m, kl_sum=0.1, k3_sum=0.1)
    base = dict(k=k, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16, min_pixels=3136, max_pixels=7056,
                harness_pixels=None, protocol=None, mask_ratio=0.6, mask_patch_size=14, mask_fill=0, seed=0,
                perception=masked is not None, checkpoint="ckpt")
    return {"tool": "megatron-papo evaluate", "format_version": 1, "settings": {**base, **settings},
            "records": recs, "datasets": {}}


def test_compare_pairs_and_refuses_mismatched_runs(tmp_path, capsys):
    from megatron_papo.cli import main
    from megatron_papo.evaluation.compare import compare_runs

    rng = np.random.default_rng(0)
    a_c, b_c = rng.integers(0, 5, 60), rng.integers(1, 5, 60)
    a = _run(a_c.tolist(), (a_c // 2).tolist())
    b = _run(b_c.tolist(), (b_c // 4).tolist(), seed=7, checkpoint="other")   # seed / checkpoint may differ
    res = compare_runs([a, b], ["a", "b"], resamples=2000)
    ov = res["comparisons"][0]["datasets"]["overall"]
    assert ov["diff"] == pytest.approx((b_c - a_c).mean() / 4)
    assert ov["ci95"][0] < ov["diff"] < ov["ci95"][1]
    assert ov["reliance"]["diff"] == pytest.approx(((b_c - b_c // 4) - (a_c - a_c // 2)).mean() / 4)
    assert set(res["comparisons"][0]["datasets"]) == {"geo", "logic", "overall"}
    assert "p_bh" in res["comparisons"][0]["datasets"]["geo"]["sign_test"]
    with pytest.raises(ValueError, match=r"different settings: k 4 vs 8; max_new_tokens 16 vs 32"):
        compare_runs([a, _run([1] * 60, k=8, max_new_tokens=32)], ["a", "c"])
    with pytest.raises(ValueError, match=r"different questions: 10 only in a .*"):
        compare_runs([a, _run([1] * 50)], ["a", "d"])
    files = []
    for name, run in (("a", a), ("b", b)):
        files.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    assert main(["compare", *files, "--out", str(out), "--plot", str(png), "--resamples", "500"]) == 0
    assert "rel diff" in capsys.readouterr().out
    assert json.loads(out.read_text())["comparisons"][0]["b"] == files[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line_error(capsys, argv) -> str:
    from megatron_papo.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_give_one_line(tmp_path, capsys):
    from megatron_papo.data import write_shards

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"checkpoint": "x", "k": 8, "datasets": {}}))
    assert "no such file" in _one_line_error(capsys, ["compare", str(tmp_path / "nope.json"), str(other)])
    assert "not a result of megatron-papo evaluate" in _one_line_error(capsys, ["compare", str(other), str(other)])
    assert "--k must be >= 1" in _one_line_error(capsys, ["evaluate", "--checkpoint", "c", "--data", "d", "--k", "0"])
    assert "fixes these settings: --k 4" in _one_line_error(
        capsys, ["evaluate", "--checkpoint", "c", "--data", "d", "--k", "4", "--protocol", "papo-eval"])
    (tmp_path / "empty").mkdir()
    write_shards([{"key": "a", "json": b"{}"}] * 0, tmp_path / "empty")
    assert "--data" in _one_line_error(capsys, ["evaluate", "--checkpoint", "c", "--data", str(tmp_path / "empty")])
    write_shards([{"key": "q0", "question": "1+1?", "answer": "2", "images": []}], tmp_path / "good")
    assert "not a checkpoint" in _one_line_error(
        capsys, ["evaluate", "--checkpoint", str(tmp_path / "nockpt"), "--data", str(tmp_path / "good")])


def test_paper_table_layout():
    from megatron_papo.evaluation.report import paper_table

    names = ["hiyouga_geometry3k", "MathVista", "We-Math", "MMK12", "MathVerse", "LogicVista",
             "SuperClevr Counting", "MMMU-Pro", "MathVerse_V"]
    ds = {n: {"avg@k": (i + 1) / 10} for i, n in enumerate(names)}
    ds["overall"] = {"avg@k": 0.5}
    table = paper_table(ds, 8)
    header, _, row = table.splitlines()[1:4]
    assert header.split(" | ")[5] == "General AVG" and header.strip(" |").split(" | ")[-2:] == ["Vision AVG", "Overall"]
    vals = [float(v) for v in row.strip(" |").split(" | ")]
    assert vals[5] == pytest.approx(30.0) and vals[10] == pytest.approx(75.0) and vals[11] == pytest.approx(50.0)
    assert paper_table({"synthetic_count": {"avg@k": 0.1}, "overall": {"avg@k": 0.1}}, 8) is None


def test_harness_resize_and_sharegpt_rows(tmp_path):
    from megatron_papo.data.sources import RowOptions, row_to_sample
    from megatron_papo.evaluation.data import harness_resize

    big = harness_resize(Image.new("RGB", (2000, 1000)), 1024, 589_824)
    assert big.width * big.height <= 589_824 and big.size == (1086, 543)
    small = harness_resize(Image.new("L", (10, 12)), 1024, 589_824)
    assert small.mode == "RGB" and small.width * small.height >= 1024 - 70 and min(small.size) >= 28
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": "<image>What is x?"}, {"role": "assistant", "content": "3"}],
           "images": ["a.png"]}
    s = row_to_sample(row, "k0", RowOptions(image_root=tmp_path, dataset="Geo3K"))
    assert (s["question"], s["answer"], s["dataset"], len(s["images"])) == ("What is x?", "3", "Geo3K", 1)
