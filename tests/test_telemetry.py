"""FLOPs of the VLM's passes (training/flops.py) against a count by hand for the tiny preset, the per-phase
FLOPs of an RL step (training/telemetry.py), and MFU from the peak table (platform/peaks.py)."""

from __future__ import annotations

import pytest
import torch


def _tiny():
    from megatron_papo.models import get_preset

    return get_preset("tiny")      # LM: h 64, 2 layers, 4 heads (hd 16), 2 KV heads, ffn 128, vocab 256


def test_language_flops_by_hand():
    from megatron_papo.training.flops import decode_flops, lm_flops

    spec = _tiny()
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate+up 64x256, down 128x64; output layer 64x256
    per_token = 2 * (2 * (4096 + 2048 + 2048 + 4096 + 16384 + 8192) + 64 * 256)
    assert per_token == 180224
    # 10 causal tokens: contexts 1..10 -> 55 query-key pairs; 4 FLOPs x 64 (heads x hd) per pair and layer
    assert lm_flops(spec, 10) == 10 * per_token + 2 * 4 * 64 * 55
    # 3 tokens decoded after a 5-token prompt attend to 6, 7, 8 keys
    assert decode_flops(spec, 5, 3) == 3 * per_token + 2 * 4 * 64 * (6 + 7 + 8)


def test_vision_flops_by_hand():
    from megatron_papo.training.flops import vision_flops

    spec = _tiny()                 # vision: hv 32, depth 2 (layer 1 full attention), ffn 64, window 112 px = 8x8
    layer = 32 * 96 + 32 * 32 + 32 * 128 + 64 * 32
    embed = 1176 * 32
    merger = 128 * 128 + 128 * 64  # per merged token (4 patches of 32 -> 128 -> 64)
    # one 8 x 8-patch image: 64 patches, 16 merged tokens; one window = the whole image in both layers
    want = 2 * 64 * (2 * layer + embed) + 2 * 16 * merger + 4 * 32 * 64 * (64 + 64)
    assert vision_flops(spec, torch.tensor([[1, 8, 8]])) == want
    # 16 x 16 patches: full attention over 256 in layer 1, windows of 64 in layer 0
    big = vision_flops(spec, torch.tensor([[1, 16, 16]]))
    assert big == 2 * 256 * (2 * layer + embed) + 2 * 64 * merger + 4 * 32 * 256 * (256 + 64)


def test_qwen3_vision_flops_by_hand():
    """The family counts its tower: no windows, a two-matrix GELU MLP, the merger and 3 DeepStack mergers."""
    from megatron_papo.models import get_preset
    from megatron_papo.training.flops import vision_flops

    spec = get_preset("qwen3-vl-tiny")   # vision: hv 32, depth 3, ffn 64, 16-px patches, deepstack (0, 1, 2)
    layer = 32 * 96 + 32 * 32 + 2 * 32 * 64
    embed = 1536 * 32
    merger = 4 * (128 * 128 + 128 * 64)
    for side in (8, 16):                  # every block attends over the whole image
        p = side * side
        want = 2 * p * (3 * layer + embed) + 2 * (p // 4) * merger + 4 * 32 * p * (3 * p)
        assert vision_flops(spec, torch.tensor([[1, side, side]])) == want


def test_phase_flops_and_mfu():
    from megatron_papo.training.flops import decode_flops, lm_flops, vision_flops
    from megatron_papo.training.sequences import Rows
    from megatron_papo.training.telemetry import phase_flops, utilisation

    spec = _tiny()
    grid = torch.tensor([[1, 8, 8]])
    prompt = torch.arange(30)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    rows = Rows([prompt, prompt], torch.ones(2, 6, dtype=torch.long), mask, [(None, grid), (None, grid)])
    f = phase_flops(spec, rows, old_recomputed=False, masked_scoring=True, reference=True, prefix_scoring=True,
                    masked_in_update=False, masked_grad=False, vision_trained=True, ppo_epochs=1)
    prefill = lm_flops(spec, 30) + vision_flops(spec, grid)          # one distinct prompt
    assert f["flops/rollout"] == prefill + decode_flops(spec, 30, 4) + decode_flops(spec, 30, 6)
    shared = prefill + lm_flops(spec, 4, context=30) + lm_flops(spec, 6, context=30)
    assert f["flops/scoring_masked"] == f["flops/scoring_ref"] == shared and f["flops/scoring_old"] == 0
    assert f["flops/update"] == 3 * (lm_flops(spec, 34) + lm_flops(spec, 36) + 2 * vision_flops(spec, grid))
    u = utilisation(f, 2.0, 2, 1000.0, peak=1e12)
    assert u["perf/mfu"] == pytest.approx(sum(f.values()) / 2 / 2.0 / 1e12)
    assert u["perf/tokens_per_s_per_gpu"] == 250.0


def test_peak_table():
    from megatron_papo.platform.peaks import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("cpu") is None
