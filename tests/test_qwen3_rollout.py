"""Rollout engine on the megatron Qwen3-VL: greedy decoding (KV cache, interleaved M-RoPE, DeepStack at prefill)
equals transformers' generate on the same weights for text and image prompts batched with left padding, at TP=1,
TP=2 and PP=2 (the PP=2 split falls among the DeepStack layers); vision special tokens are never sampled.
One 2-rank spawn runs every layout."""

from __future__ import annotations

import torch

from hf_tiny import IMG, VEND, VSTART, make_qwen3_model
from test_rollout import _hf_greedy
from test_qwen3_vl import PATCH_DIM, _load

NEW = 8


def _prompts():
    """A text prompt, a one-image prompt and a two-image prompt of different sizes: (input_ids, pixels, grid)."""
    g = torch.Generator().manual_seed(1)
    txt = lambda n: torch.randint(0, 240, (n,), generator=g).tolist()  # noqa: E731
    img = lambda grid: [VSTART] + [IMG] * (int(grid.prod()) // 4) + [VEND]  # noqa: E731
    one, two = torch.tensor([[1, 4, 8]]), torch.tensor([[1, 6, 4], [1, 4, 4]])
    pixels = lambda grid: torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g)  # noqa: E731
    return [
        (torch.tensor(txt(7)), None, None),
        (torch.tensor(txt(3) + img(one[0]) + txt(4)), pixels(one), one),
        (torch.tensor(txt(2) + img(two[0]) + txt(1) + img(two[1]) + txt(3)), pixels(two), two),
    ]


def _engine_body(rank, world_size, hf_dir, prompts_raw):
    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.platform import init_model_parallel
    from megatron_papo.rollout import MegatronEngine, SamplingParams

    prompts = [PromptInputs(*p) for p in prompts_raw]
    results = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_model_parallel(tp=tp, pp=pp)
        engine = MegatronEngine(_load(hf_dir), max_seq_len=64, eos_ids=[])
        out = engine.generate(prompts, 2, SamplingParams(greedy=True, max_new_tokens=NEW), seed=0)
        results[f"tp{tp}pp{pp}"] = out.response_ids.tolist()
        if tp == 1 and pp == 1:  # sampling at a high temperature never picks a banned vision token
            hot = engine.generate(prompts, 4, SamplingParams(temperature=5.0, max_new_tokens=NEW), seed=3)
            results["hot"] = hot.response_ids[hot.response_mask.bool()].tolist()
    return results


def test_greedy_matches_transformers_generate_at_tp1_tp2_pp2(tmp_path):
    from multirank import run_multirank

    hf_dir = str(tmp_path / "hf")
    hf = make_qwen3_model(hf_dir, seed=3)
    prompts = _prompts()
    want = [_hf_greedy(hf, p) for p in prompts]
    results = run_multirank(_engine_body, world_size=2, args=(hf_dir, prompts))
    for layout in ("tp1pp1", "tp2pp1", "tp1pp2"):
        got = [r[layout] for r in results if layout in r]
        assert got, layout
        for rows in got:
            assert rows == [w for w in want for _ in range(2)], layout
    hot = [t for r in results if "hot" in r for t in r["hot"]]
    assert hot and not {IMG, VSTART} & set(hot)
