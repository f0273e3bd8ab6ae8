"""The GPU path's rules, checked on CPU: FP8 recipe support per GPU generation (faked capabilities), FP8 token
padding (padded micro-batches give the same log-probs, loss and gradients as unpadded ones), the one-line
optional-accelerator notice, and the ``gpu`` extra of setup.py."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from multirank import run_multirank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- FP8 recipes per GPU generation -------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, cc, cuda, ok", [
    ("delayed", (9, 0), "12.4", True), ("tensorwise", (8, 9), "12.4", True), ("delayed", (8, 0), "12.4", False),
    ("blockwise", (9, 0), "12.9", True), ("blockwise", (9, 0), "12.8", False), ("blockwise", (10, 0), "12.9", False),
    ("mxfp8", (10, 0), "12.8", True), ("mxfp8", (9, 0), "13.0", False), ("mxfp8", (12, 0), "12.9", False),
    ("tensorwise", (10, 0), "12.8", True),
])
def test_fp8_recipe_support_table(recipe, cc, cuda, ok):
    from megatron_papo.platform.gpu import fp8_recipe_support

    assert fp8_recipe_support(recipe, cc, cuda)[0] is ok


def test_generation_names_and_peaks():
    from megatron_papo.platform.gpu import bf16_peak_flops, generation

    assert generation((9, 0)) == "Hopper (compute capability 9.0)"
    assert generation((8, 9)).startswith("Ada") and generation((10, 3)).startswith("Blackwell")
    assert generation((8, 6)).startswith("Ampere") and generation((13, 0)).startswith("newer than Blackwell")
    assert bf16_peak_flops("NVIDIA H200") == 989e12 and bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_flops("NVIDIA H20") == 148e12 and bf16_peak_flops("NVIDIA L40") == 181e12
    assert bf16_peak_flops("Some Future GPU") is None


def test_unrunnable_recipe_is_one_line_naming_the_generation(monkeypatch):
    from megatron_papo.platform import gpu

    monkeypatch.setattr(gpu, "device_capability", lambda: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ValueError) as e:
        gpu.check_fp8_recipe("mxfp8")
    msg = str(e.value)
    assert "\n" not in msg and "Hopper (compute capability 9.0)" in msg and "model.fp8_recipe=mxfp8" in msg
    assert "use model.fp8_recipe=delayed / tensorwise" in msg          # blockwise needs CUDA >= 12.9
    monkeypatch.setattr(gpu, "device_capability", lambda: (8, 0))
    with pytest.raises(ValueError, match=r"Ampere \(compute capability 8.0\).*set model.fp8=null"):
        gpu.check_fp8_recipe("delayed")
    monkeypatch.setattr(gpu, "device_capability", lambda: (10, 0))
    with pytest.raises(ValueError, match=r"blockwise needs Hopper.*Blackwell \(compute capability 10.0\)"):
        gpu.check_fp8_recipe("blockwise")
    gpu.check_fp8_recipe("mxfp8")


def test_config_offers_the_four_recipes():
    from megatron_papo.config import ConfigError, load_config

    for r in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        assert load_config(None, [f"model.fp8_recipe={r}"]).model.fp8_recipe == r
    with pytest.raises(ConfigError, match="model.fp8_recipe"):
        load_config(None, ["model.fp8_recipe=fp4"])


# --- FP8 token padding --------------------------------------------------------------------------------------------
def test_padded_seq_len_arithmetic():
    from megatron_papo.models.fp8_padding import padded_seq_len, token_multiple

    assert token_multiple(None, "delayed") == 1 and token_multiple("hybrid", "mxfp8") == 32
    assert token_multiple("e4m3", "blockwise") == 16
    for s in range(1, 70):
        for b in (1, 2, 3, 4, 6, 8, 16):
            p = padded_seq_len(s, b, 16)
            assert (p * b) % 16 == 0 and all((q * b) % 16 for q in range(s, p)), (s, b, p)   # smallest such
    assert padded_seq_len(13, 4, 1) == 13 and padded_seq_len(13, 4, 16) == 16 and padded_seq_len(13, 3, 32) == 32


def _padding_body(rank, world):
    from test_scoring import IMG, PAD, VSTART, _rows

    from megatron_papo.models import build_vlm
    from megatron_papo.models.fp8_padding import aligned
    from megatron_papo.training.sequences import pack, response_stats, run_schedule, seq_len

    model = build_vlm("tiny", vocab_size=256, image_token_id=IMG, vision_start_token_id=VSTART)
    real, _ = _rows()

    def loss_fn(logits, mb):
        logp = response_stats(logits, mb, 1.0)[0]                               # [b, T]
        loss = -(logp * mb.resp_mask).sum()
        return loss, {"loss": loss.detach(), "logp": logp.detach()}

    out = {}
    for name, multiple in (("plain", 1), ("fp8", 16), ("mxfp8", 32)):
        with aligned(multiple):
            mbs = pack(real, 3, PAD, seq_len(real), image_token_id=IMG)
        model.zero_grad(set_to_none=True)
        res = run_schedule(model, mbs, loss_fn, forward_only=False)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[name] = dict(shape=tuple(mbs[0].input_ids.shape), loss=sum(float(r["loss"]) for r in res),
                         logp=torch.cat([r["logp"] for r in res]), grads=grads)
    return out


def test_fp8_padding_keeps_log_probs_loss_and_gradients():
    out = run_multirank(_padding_body, 1, tp=1, pp=1)[0]
    plain = out["plain"]
    for name, multiple in (("fp8", 16), ("mxfp8", 32)):
        b, s = out[name]["shape"]
        assert (b * s) % multiple == 0 and s > plain["shape"][1], (name, out[name]["shape"], plain["shape"])
        torch.testing.assert_close(out[name]["logp"], plain["logp"], rtol=1e-5, atol=1e-5)
        assert abs(out[name]["loss"] - plain["loss"]) <= 1e-4 * abs(plain["loss"])
        torch.testing.assert_close(out[name]["grads"], plain["grads"], rtol=1e-4, atol=1e-6)


def test_fp8_off_restores_the_config():
    from types import SimpleNamespace

    from megatron_papo.models.fp8_padding import fp8_off

    model = SimpleNamespace(language_model=SimpleNamespace(config=SimpleNamespace(fp8="hybrid")))
    with fp8_off(model):
        assert model.language_model.config.fp8 is None
    assert model.language_model.config.fp8 == "hybrid"
    plain = SimpleNamespace(language_model=SimpleNamespace(config=SimpleNamespace(fp8=None)))
    with fp8_off(plain):
        assert plain.language_model.config.fp8 is None


# --- start-up notice -----------------------------------------------------------------------------------------------
def test_megatron_fallback_warnings_become_one_line():
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-m", "megatron_papo.cli", "train", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from megatron_papo.platform.accelerators import NOTICE_PREFIX, missing

    notices = [ln for ln in r.stderr.splitlines() if ln.startswith(NOTICE_PREFIX)]
    assert len(notices) == (1 if missing() else 0), r.stderr
    assert "not installed" not in r.stderr, r.stderr                       # none of megatron's 14 lines
    if missing():
        assert all(name in notices[0] for name in missing())


def test_other_warnings_still_show():
    code = ("import warnings, megatron_papo; warnings.warn('unrelated warning 123'); "
            "import megatron.core.optimizer")
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "unrelated warning 123" in r.stderr and "not installed" not in r.stderr


# --- setup.py extras ------------------------------------------------------------------------------------------------
# Names that must never be in an extra: the registry's `apex` is an unrelated web toolkit (NVIDIA apex is not on
# the registry), and Transformer Engine's torch extension is a source distribution that needs
# `pip install --no-build-isolation` against the installed torch and a CUDA toolkit, which an extra cannot say.
_NEVER = {"apex", "transformer-engine", "transformer-engine-torch"}


def _extras() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = next(k for k in call.keywords if k.arg == "extras_require")
    return ast.literal_eval(kw.value)


def test_extras_never_pull_an_impostor_or_a_source_build():
    import re

    extras = _extras()
    assert "gpu" in extras
    for name, reqs in extras.items():
        for req in reqs:
            dist = re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")
            assert dist not in _NEVER, f"extra '{name}' requires {req!r}"
