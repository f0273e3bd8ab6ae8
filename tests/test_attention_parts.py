"""Shared-prompt attention (decode and scoring) against a float64 reference that attends to the concatenated keys.

The engine's attention reads each prompt's keys once for all its sample rows and merges the two softmax parts
(prompt, the row's own response) through their log-sum-exps; the reference builds every row's full key list
(its prompt's real tokens, then its own keys up to each query) and applies one softmax in float64. Covers left
padding, unequal rows per prompt (some finished), a prompt whose rows all finished, decode (one query per row)
and scoring (sq queries, causal on the own part), with the fused CPU kernel and with the plain-op formula.

Legend: P prompts, b rows, L prompt length, t own keys, sq queries per row, ng groups, rep heads per group.
"""

from __future__ import annotations

import math

import pytest
import torch
from vlm_helpers import sdp_attention

NG, REP, HN = 2, 3, 8


def _attention():
    return sdp_attention(NG, REP, HN, "causal")


def _case(counts, sq, padded, seed=0):
    from megatron_papo.models.common.attention import SharedPrefixKV

    g = torch.Generator().manual_seed(seed)
    P, L, t, b = len(counts), 7, sq + 4, sum(counts)
    keep = torch.ones(P, L, dtype=torch.bool)
    if padded:
        keep[0, :3], keep[-1, :1] = False, False  # left padding of shorter prompts
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kv = SharedPrefixKV(rnd(P, NG, L, HN), rnd(P, NG, L, HN), keep, list(counts), rnd(b, NG, t, HN),
                        rnd(b, NG, t, HN), prefix_padded=padded)
    return rnd(sq, b, NG * REP, HN), kv


def _reference(query, kv):
    """float64 [sq, b, np*hn]: each row's query j sees its prompt's real keys and its own keys 0 .. t-sq+j."""
    sq, b = query.shape[:2]
    t = kv.own_key.shape[2]
    prompt_of = torch.repeat_interleave(torch.arange(len(kv.row_counts)), torch.tensor(kv.row_counts))
    out = torch.empty(sq, b, NG * REP, HN, dtype=torch.float64)
    for r in range(b):
        p = int(prompt_of[r])
        real = kv.prefix_keep[p]
        for j in range(sq):
            for h in range(NG * REP):
                grp = h // REP
                k = torch.cat([kv.prefix_key[p, grp][real], kv.own_key[r, grp, :t - sq + j + 1]]).double()
                v = torch.cat([kv.prefix_value[p, grp][real], kv.own_value[r, grp, :t - sq + j + 1]]).double()
                w = torch.softmax(k @ query[j, r, h].double() / math.sqrt(HN), 0)
                out[j, r, h] = w @ v
    return out.reshape(sq, b, -1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("counts,sq,padded", [
    ([3, 3, 3], 1, True),  # decoding, every row running
    ([3, 3, 3], 1, False),  # prompts of one length: no prefix mask
    ([1, 1, 1, 1], 1, True),  # n = 1
    ([2, 0, 1, 3], 1, True),  # after compaction: unequal rows, a prompt with none left
    ([2, 2, 1], 3, True),  # scoring: sq queries per row, causal on the own keys
])
def test_shared_prefix_attention_equals_float64_reference(monkeypatch, counts, sq, padded, fused):
    from megatron_papo.models.common import attention

    if not fused:
        monkeypatch.setattr(attention, "_CPU_FLASH", None)  # the plain-op formula (other devices)
    elif attention._CPU_FLASH is None:
        pytest.skip("this torch build has no fused CPU attention kernel")
    query, kv = _case(counts, sq, padded)
    with torch.no_grad():  # as the engine and scoring run it (the fused kernel is for inference)
        got = _attention()(query, kv, kv, None)
    assert got.shape == (sq, sum(counts), NG * REP * HN) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(query, kv), atol=2e-6, rtol=2e-6)


def test_softmax_part_log_sum_exp_equals_float64():  # fused kernel (no grad); the plain formula is above
    from megatron_papo.models.common.attention import softmax_part

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, NG, 4, HN, generator=g) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 4)
    bias[0, ..., :2] = float("-inf")
    with torch.no_grad():
        out, lse = softmax_part(q, k, v, 0.5, bias)
    s = 0.5 * q.double() @ k.double().transpose(-1, -2) + bias.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), atol=1e-6, rtol=1e-6)
