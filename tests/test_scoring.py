"""Prefix-shared scoring (each distinct prompt run once, the rows' responses against its cached keys) gives the
same response log-probs as the plain forward of every prompt + response row through megatron's schedule, at
TP=1 and TP=2, with prompts of different lengths (left padding in the prefill), images of different sizes, an
image token sampled inside a response, rows of different lengths, and real + masked rows together."""

from __future__ import annotations

import pytest
import torch

from multirank import run_multirank

IMG, VSTART, VEND, PAD = 250, 251, 252, 0
T = 6


def _rows():
    from megatron_papo.training.sequences import Rows

    g = torch.Generator().manual_seed(7)
    txt = lambda k: torch.randint(3, 200, (k,), generator=g).tolist()  # noqa: E731
    prompts, images, masked = [], [], []
    for text_len, grid in ((5, [1, 4, 4]), (11, [1, 4, 8]), (2, [1, 8, 4])):
        grid = torch.tensor([grid])
        ids = txt(2) + [VSTART] + [IMG] * (int(grid.prod()) // 4) + [VEND] + txt(text_len)
        prompts.append(torch.tensor(ids))
        images.append((torch.randn(int(grid.prod()), 1176, generator=g), grid))
        masked.append((torch.randn(int(grid.prod()), 1176, generator=g), grid))
    n = 3
    resp = torch.randint(3, 200, (3 * n, T), generator=g)
    resp[4, 2] = IMG                                         # a sampled image token: fed as pad, scored as itself
    lengths = torch.tensor([6, 3, 1, 6, 5, 2, 4, 6, 6])
    mask = torch.arange(T)[None] < lengths[:, None]
    resp = resp.masked_fill(~mask, PAD)
    # rows share their prompt's objects, as the trainer's do
    real = Rows([prompts[i // n] for i in range(3 * n)], resp, mask, [images[i // n] for i in range(3 * n)])
    return real, real.with_images([masked[i // n] for i in range(3 * n)])


def _body(rank, world_size):
    from megatron_papo.models import build_vlm
    from megatron_papo.training.scoring import prefix_shared_logprobs, prompt_groups, schedule_logprobs

    model = build_vlm("tiny", vocab_size=256, image_token_id=IMG, vision_start_token_id=VSTART)
    with torch.no_grad():                                    # sharper attention / logits than the 0.02 init
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    real, masked = _rows()
    both = real.concat(masked)
    out = {"groups": len(prompt_groups(both))}
    for name, rows in (("real", real), ("both", both)):
        plain = schedule_logprobs(model, rows, 4, PAD, IMG, 0.7)
        for mbs in (4, 64):                                  # one prompt group per chunk, or all in one
            shared = prefix_shared_logprobs(model, rows, mbs, PAD, IMG, 0.7)
            out[f"{name}/{mbs}"] = ((shared - plain).abs().max().item(), plain.abs().mean().item())
    out["training_restored"] = model.training
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_prefix_shared_scoring_equals_plain_forward(tp):
    res = run_multirank(_body, tp, tp=tp, pp=1)
    for r in res:
        assert r["groups"] == 6                              # 3 prompts x (real, masked): each run once
        assert r["training_restored"]
        for key, (diff, scale) in ((k, v) for k, v in r.items() if "/" in k):
            assert scale > 0.5, f"{key}: log-probs too close to 0 to compare ({scale})"
            assert diff < 2e-5, f"{key}: prefix-shared scoring differs from the plain forward by {diff}"
