"""Our megatron Qwen3-VL against transformers' Qwen3VLForConditionalGeneration on the same weights.

One spawned 2-rank run checks TP=1, TP=2 and PP=2 on three inputs (text only, one image, a batch holding two
images of different sizes and one image) for a model whose 3 DeepStack layers straddle the PP=2 split (the
features travel with the activations), a tied-embedding model (TP=2), a model whose 2 DeepStack layers sit on
stage 0 (PP=2), KV-cache decoding at TP=2, and the rollout engine's greedy tokens against transformers'
``generate`` at every layout; the rest runs in-process (interleaved M-RoPE table, spec errors, FP8/TE errors).
"""

from __future__ import annotations

import os

import pytest
import torch

import vlm_helpers
from hf_tiny import IMG, VSTART, make_qwen3_model, tiny_qwen3_config
from test_rollout import _hf_greedy
from vlm_helpers import hf_logits, image_run, kv_cache_logits, pipeline_logits

PATCH_DIM = vlm_helpers.PATCH_DIM["qwen3-vl"]
NEW = 8


def make_inputs(seed: int = 0) -> list[dict]:
    return vlm_helpers.make_inputs("qwen3-vl", seed)


def _load(hf_dir):
    import json

    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.models import build_vlm, spec_from_hf_config

    model = build_vlm(spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))).eval()
    fill_from_hf(model, HFCheckpoint(hf_dir))
    return model


def _greedy(model, prompts_raw) -> dict:
    """The rollout engine's greedy tokens (2 samples per prompt) and tokens sampled hot at TP=1."""
    from megatron.core import parallel_state as ps

    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.rollout import MegatronEngine, SamplingParams

    prompts = [PromptInputs(*p) for p in prompts_raw]
    engine = MegatronEngine(model, max_seq_len=64, eos_ids=[])
    out = {"greedy": engine.generate(prompts, 2, SamplingParams(greedy=True, max_new_tokens=NEW), seed=0)
           .response_ids.tolist()}
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() == 1:
        hot = engine.generate(prompts, 4, SamplingParams(temperature=5.0, max_new_tokens=NEW), seed=3)
        out["hot"] = hot.response_ids[hot.response_mask.bool()].tolist()
    return out


def _layouts_body(rank, world_size, dirs, cases, refs, extra_refs, prompts):
    from megatron_papo.platform import init_model_parallel

    diffs, rollouts = {}, {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_model_parallel(tp=tp, pp=pp)
        model = _load(dirs["main"])
        if pp == 2:
            diffs["pp2_width_factor"] = model.pipeline_hidden_size / model.spec.hidden_size - 2  # 1 feature carried
        for i, case in enumerate(cases):
            out = pipeline_logits(model, case)
            if out is not None:
                diffs[f"tp{tp}pp{pp}_case{i}"] = (out - refs[i]).abs().max().item()
        rollouts[f"tp{tp}pp{pp}"] = _greedy(model, prompts)
        if tp == 2:
            diffs["tp2_kv_cache_case2"] = (kv_cache_logits(model, cases[2]) - refs[2][:, -3:]).abs().max().item()
            tied = pipeline_logits(_load(dirs["tied"]), cases[2])
            diffs["tp2_tied_case2"] = (tied - extra_refs["tied"]).abs().max().item()
        if pp == 2:  # both deepstack layers on stage 0: nothing rides along
            model = _load(dirs["stage0"])
            diffs["pp2_width_factor_stage0"] = model.pipeline_hidden_size / model.spec.hidden_size - 1
            out = pipeline_logits(model, cases[2])
            if out is not None:
                diffs["pp2_stage0_deepstack_case2"] = (out - extra_refs["stage0"]).abs().max().item()
    return {"diffs": diffs, "rollouts": rollouts}


def _prompts():
    """A text prompt, a one-image prompt and a two-image prompt of different sizes: (input_ids, pixels, grid)."""
    g = torch.Generator().manual_seed(1)
    txt = lambda n: torch.randint(0, 240, (n,), generator=g).tolist()  # noqa: E731
    one, two = torch.tensor([[1, 4, 8]]), torch.tensor([[1, 6, 4], [1, 4, 4]])
    pixels = lambda grid: torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g)  # noqa: E731
    return [
        (torch.tensor(txt(7)), None, None),
        (torch.tensor(txt(3) + image_run(one[0]) + txt(4)), pixels(one), one),
        (torch.tensor(txt(2) + image_run(two[0]) + txt(1) + image_run(two[1]) + txt(3)), pixels(two), two),
    ]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One 2-rank spawn: logits, KV cache and greedy rollouts at TP=1, TP=2, PP=2, with transformers' references."""
    from multirank import run_multirank

    root = tmp_path_factory.mktemp("qwen3")
    dirs = {k: str(root / k) for k in ("main", "tied", "stage0")}
    hf = make_qwen3_model(dirs["main"])
    cases, prompts = make_inputs(), _prompts()
    refs = [hf_logits(hf, c) for c in cases]
    # megatron ties embeddings across pipeline stages with a CUDA all-reduce: tied is checked at TP=2
    extra = {"tied": hf_logits(make_qwen3_model(dirs["tied"], seed=1, tied=True), cases[2]),
             "stage0": hf_logits(make_qwen3_model(dirs["stage0"], seed=2, deepstack=(1, 2)), cases[2])}
    results = run_multirank(_layouts_body, world_size=2, args=(dirs, cases, refs, extra, prompts))
    return results, [_hf_greedy(hf, p) for p in prompts]


def test_logits_match_hf_at_tp1_tp2_pp2(layouts):
    diffs = {k: v for r in layouts[0] for k, v in r["diffs"].items()}
    assert len(diffs) == 14, sorted(diffs)
    assert max(abs(v) for v in diffs.values()) < 1e-4, diffs


def test_greedy_rollout_matches_transformers_generate_at_tp1_tp2_pp2(layouts):
    """KV-cache decoding with interleaved M-RoPE and DeepStack at prefill (carried across the PP=2 split)."""
    results, want = layouts
    for layout in ("tp1pp1", "tp2pp1", "tp1pp2"):
        for r in results:
            assert r["rollouts"][layout]["greedy"] == [w for w in want for _ in range(2)], layout
    hot = [t for r in results for t in r["rollouts"]["tp1pp1"].get("hot", [])]
    assert hot and not {IMG, VSTART} & set(hot)  # vision special tokens are never sampled


def test_interleaved_mrope_table_matches_hf():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from megatron_papo.models.qwen3_vl.layers import InterleavedMRoPE

    text = tiny_qwen3_config().text_config
    pos = torch.randint(0, 50, (3, 2, 7))
    cos, _ = Qwen3VLTextRotaryEmbedding(text)(torch.zeros(1, dtype=torch.float32), pos)  # [b, s, hd]
    ours = InterleavedMRoPE(16, 10000.0)(pos, [2, 3, 3])  # [s, b, 1, hd]
    assert torch.allclose(ours[:, :, 0].transpose(0, 1).cos(), cos, atol=1e-6)
    # Qwen2-VL's chunked layout (frequencies 0-1 time, 2-4 height, 5-7 width) is a different table
    freqs = pos.float()[..., None] * InterleavedMRoPE(16, 10000.0).inv_freq  # [3, b, s, 8]
    chunked = torch.cat([freqs[0, ..., :2], freqs[1, ..., 2:5], freqs[2, ..., 5:]], dim=-1)
    assert not torch.allclose(torch.cat([chunked, chunked], -1).cos(), cos, atol=1e-3)


def test_spec_from_hf_config_and_errors():
    from megatron_papo.models import spec_from_hf_config
    from megatron_papo.models.qwen3_vl import Qwen3VLSpec

    cfg = tiny_qwen3_config().to_dict()
    spec = spec_from_hf_config(cfg)
    assert isinstance(spec, Qwen3VLSpec) and spec.head_dim == 16 and spec.mrope_section == (2, 3, 3)
    assert spec.vision.deepstack_visual_indexes == (0, 1, 2) and spec.vision.patch_size == 16
    bad = {**cfg, "vision_config": {**cfg["vision_config"], "deepstack_visual_indexes": [0, 7]}}
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        spec_from_hf_config(bad)
    with pytest.raises(ValueError, match="supported: Qwen2.5-VL"):
        spec_from_hf_config({**cfg, "model_type": "llava", "architectures": ["Llava"]})


def test_fp8_and_te_requests_fail_clearly_without_support():
    from megatron_papo.models import build_vlm

    with pytest.raises(ValueError, match="transformer_impl=transformer_engine"):
        build_vlm("qwen3-vl-tiny", fp8="e4m3")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            build_vlm("qwen3-vl-tiny", transformer_impl="transformer_engine")
