"""Our megatron Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration on the same weights.

One spawned 2-rank run checks TP=1, TP=2 and PP=2 on three inputs (text only, one image, a batch holding two
images and one image), and KV-cache decoding at TP=2; the rest runs in-process (rope index, specs' error paths, presets).
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_tiny import IMG, VEND, VSTART, make_hf_model, tiny_hf_config


def _image_run(grid):
    return [VSTART] + [IMG] * (int(grid[0] * grid[1] * grid[2]) // 4) + [VEND]


def make_inputs(seed: int = 0) -> list[dict]:
    """Text only (b=2), one image (b=1), and b=2 with two images in sample 0 and one in sample 1."""
    g = torch.Generator().manual_seed(seed)
    txt = lambda n: torch.randint(0, 240, (n,), generator=g).tolist()
    cases = [dict(input_ids=torch.tensor([txt(11), txt(11)]))]
    grid1 = torch.tensor([[1, 8, 12]])
    cases.append(dict(input_ids=torch.tensor([txt(3) + _image_run(grid1[0]) + txt(5)]), image_grid_thw=grid1))
    grids = torch.tensor([[1, 4, 4], [1, 8, 4], [1, 4, 8]])
    s0 = txt(2) + _image_run(grids[0]) + txt(3) + _image_run(grids[1]) + txt(2)
    s1 = txt(4) + _image_run(grids[2])
    s1 += txt(len(s0) - len(s1))
    cases.append(dict(input_ids=torch.tensor([s0, s1]), image_grid_thw=grids))
    for c in cases:
        if "image_grid_thw" in c:
            c["pixel_values"] = torch.randn(int(c["image_grid_thw"].prod(-1).sum()), 1176, generator=g)
    return cases


@torch.no_grad()
def hf_logits(model, case: dict) -> torch.Tensor:
    ids = case["input_ids"]
    out = model(input_ids=ids, pixel_values=case.get("pixel_values"), image_grid_thw=case.get("image_grid_thw"),
                mm_token_type_ids=(ids == IMG).int(), attention_mask=torch.ones_like(ids))
    return out.logits.float()


@torch.no_grad()
def megatron_logits(model, case: dict) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on the last stage (None elsewhere); stages hand activations on by p2p."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    kwargs = dict(pixel_values=case.get("pixel_values"), image_grid_thw=case.get("image_grid_thw"),
                  runtime_gather_output=True)
    ids = case["input_ids"]
    if not ps.is_pipeline_first_stage():
        recv = torch.empty(ids.shape[1], ids.shape[0], model.spec.hidden_size)
        dist.recv(recv, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(recv)
    out = model(ids, **kwargs)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    return out[..., : model.spec.vocab_size].float()


@torch.no_grad()
def kv_cache_logits(model, case: dict, num_decode: int = 2) -> torch.Tensor:
    """Prefill all but the last num_decode tokens, then decode them one at a time with megatron's static KV
    cache; returns the logits of the last prefill token and each decoded one [b, 1 + num_decode, V].
    M-RoPE under the static cache needs the position ids of the whole sequence so far at every step."""
    from megatron.core.inference.contexts import StaticInferenceContext

    ids = case["input_ids"]
    pos = model.position_ids(ids, case.get("image_grid_thw"))
    ctx = StaticInferenceContext(ids.shape[0], ids.shape[1])
    n = ids.shape[1] - num_decode
    outs = [model(ids[:, :n], position_ids=pos[:, :, :n], pixel_values=case.get("pixel_values"),
                  image_grid_thw=case.get("image_grid_thw"), inference_context=ctx, runtime_gather_output=True)]
    ctx.sequence_len_offset += n
    for j in range(n, ids.shape[1]):
        outs.append(model(ids[:, j:j + 1], position_ids=pos[:, :, :j + 1], inference_context=ctx,
                          runtime_gather_output=True))
        ctx.sequence_len_offset += 1
    return torch.cat([o[:, -1:, : model.spec.vocab_size] for o in outs], dim=1)


def _layouts_body(rank, world_size, hf_dir, cases, refs):
    from megatron_papo.convert import HFCheckpoint, fill_from_hf
    from megatron_papo.models import build_vlm, spec_from_hf_config
    from megatron_papo.platform import init_model_parallel
    import json

    spec = spec_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))
    diffs = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_model_parallel(tp=tp, pp=pp)
        model = build_vlm(spec).eval()
        fill_from_hf(model, HFCheckpoint(hf_dir))
        for i, case in enumerate(cases):
            out = megatron_logits(model, case)
            if out is not None:
                diffs[f"tp{tp}pp{pp}_case{i}"] = (out - refs[i]).abs().max().item()
            if pp == 1 and tp == 2 and i == 2:
                diffs["tp2_kv_cache_case2"] = (kv_cache_logits(model, case) - refs[i][:, -3:]).abs().max().item()
    frozen = build_vlm(spec, freeze_vision=True)
    if frozen.vision is not None:
        assert not any(p.requires_grad for p in frozen.vision.parameters())
        assert all(p.requires_grad for p in frozen.language_model.parameters())
    return diffs


def test_logits_match_hf_at_tp1_tp2_pp2(tmp_path):
    from multirank import run_multirank

    hf = make_hf_model(str(tmp_path / "hf"))
    cases = make_inputs()
    refs = [hf_logits(hf, c) for c in cases]
    results = run_multirank(_layouts_body, world_size=2, args=(str(tmp_path / "hf"), cases, refs))
    diffs = {k: v for r in results for k, v in r.items()}
    assert len(diffs) == 10, diffs
    assert max(diffs.values()) < 1e-4, diffs


def test_rope_index_matches_hf():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models import get_rope_index

    hf = Qwen2_5_VLForConditionalGeneration(tiny_hf_config())
    for case in make_inputs(seed=3)[1:]:
        ids = case["input_ids"]
        ref, ref_delta = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == IMG).int(),
                                                 image_grid_thw=case["image_grid_thw"])
        ours, delta = get_rope_index(ids, case["image_grid_thw"], image_token_id=IMG, vision_start_token_id=VSTART)
        assert torch.equal(ours, ref) and torch.equal(delta.flatten(), ref_delta.flatten())


def test_rope_index_left_padding_and_text_only():
    from megatron_papo.models import get_rope_index

    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(ids, None, mask, image_token_id=IMG, vision_start_token_id=VSTART)
    assert pos[:, 0].tolist() == [[1, 1, 0, 1, 2]] * 3
    assert pos[:, 1].tolist() == [[0, 1, 2, 3, 4]] * 3
    assert delta.flatten().tolist() == [0, 0]


def test_presets_have_published_dimensions():
    from megatron_papo.models import PRESETS

    want = {"qwen2.5-vl-3b": (2048, 36, 16, 2, 11008, True), "qwen2.5-vl-7b": (3584, 28, 28, 4, 18944, False),
            "qwen2.5-vl-32b": (5120, 64, 40, 8, 27648, False), "qwen2.5-vl-72b": (8192, 80, 64, 8, 29568, False)}
    for name, (h, layers, heads, kv, inter, tied) in want.items():
        s = PRESETS[name]
        s.validate()
        assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.intermediate_size,
                s.tie_word_embeddings) == (h, layers, heads, kv, inter, tied)
        assert s.vision.out_hidden_size == h and s.vision.depth == 32 and s.vision.hidden_size == 1280
    PRESETS["tiny"].validate()


def test_fp8_and_te_requests_fail_clearly_without_support():
    from megatron_papo.models.common.specs import check_transformer_impl
    from megatron_papo.platform import fp8_available

    check_transformer_impl("local", None)
    with pytest.raises(ValueError, match="transformer_impl=transformer_engine"):
        check_transformer_impl("local", "e4m3")
    with pytest.raises(ValueError, match="unknown"):
        check_transformer_impl("te", None)
    if not fp8_available()[0]:
        with pytest.raises(ValueError, match="model.fp8"):
            check_transformer_impl("transformer_engine", "hybrid")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            check_transformer_impl("transformer_engine", None)
