"""Vocab-parallel log-prob / entropy / KL against a float64 unsharded log_softmax reference, at TP = 1, 2, 4.

Each rank builds the same full logits from a seed, keeps its contiguous vocabulary shard, and compares values and
its shard of the gradients with the reference computed on the concatenated (full) logits. All checks of one
tensor-parallel size run in one spawned job to keep the file fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from multirank import run_multirank

import megatron_papo.ops.vocab_parallel as vp
from megatron_papo.ops import (
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
    vocab_parallel_pair_stats,
    vocab_parallel_token_stats,
)

V = 20  # full (padded) vocabulary: divisible by 1, 2 and 4
TOL = dict(rtol=1e-5, atol=1e-5)

# name -> (function(p, q, targets, T), output names); q / targets unused where the function takes none
OPS = {
    "log_probs": (lambda p, q, t, T, g: (vocab_parallel_log_probs(p, t, g, T),), ("logp",)),
    "entropy": (lambda p, q, t, T, g: (vocab_parallel_entropy(p, g, T),), ("entropy",)),
    "kl": (lambda p, q, t, T, g: (vocab_parallel_kl(p, q, g, T),), ("kl",)),
    "token_stats": (lambda p, q, t, T, g: vocab_parallel_token_stats(p, t, g, T), ("logp", "entropy")),
    "pair_stats": (lambda p, q, t, T, g: tuple(vocab_parallel_pair_stats(p, q, t, g, T)),
                   ("logp", "entropy", "logq", "kl")),
}


def make_case(seed: int, lead: tuple, pad: int, holes: float = 0.1):
    """Full float32 logits p, q [*lead, V] with the last ``pad`` ids -inf (padded vocabulary) and a random
    ``holes`` fraction of -inf entries (masked vocabulary, same pattern in p and q), targets avoiding both."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(*lead, V, generator=g) * 3
    q = p + torch.randn(*lead, V, generator=g)  # a related distribution, as the masked-image branch is
    masked = torch.rand(*lead, V, generator=g) < holes
    masked[..., V - pad:] = True
    targets = torch.multinomial((~masked).reshape(-1, V).float(), 1, generator=g).reshape(lead)
    p, q = p.masked_fill(masked, float("-inf")), q.masked_fill(masked, float("-inf"))
    weights = {k: torch.randn(lead, generator=g) for k in ("logp", "entropy", "logq", "kl")}
    return p, q, targets, weights


def reference(p, q, targets, T: float) -> dict:
    """float64 results on the full vocabulary with plain log_softmax (0 * log 0 := 0)."""
    lp, lq = F.log_softmax(p / T, -1), F.log_softmax(q / T, -1)
    lp0, lq0 = lp.masked_fill(torch.isinf(lp), 0.0), lq.masked_fill(torch.isinf(lq), 0.0)
    probs = lp.exp()
    return {
        "logp": lp.gather(-1, targets[..., None])[..., 0],
        "entropy": -(probs * lp0).sum(-1),
        "logq": lq.gather(-1, targets[..., None])[..., 0],
        "kl": (probs * (lp0 - lq0)).sum(-1),
    }


def _shard(x: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    vl = x.shape[-1] // tp
    return x[..., rank * vl:(rank + 1) * vl]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().view(torch.int16 if x.element_size() == 2 else torch.int32)


def check_against_reference(rank: int, tp: int, group, seed: int, lead: tuple, pad: int, T: float,
                            dtype=torch.float32):
    """Every op, values and gradients of a weighted loss, against the float64 reference on the full logits."""
    p, q, targets, w = make_case(seed, lead, pad)
    p64, q64 = p.double().requires_grad_(), q.double().requires_grad_()
    for name, (fn, outs) in OPS.items():
        ref = reference(p64, q64, targets, T)
        ref_loss = sum((w[k] * ref[k]).sum() for k in outs)
        ref_gp, ref_gq = torch.autograd.grad(ref_loss, (p64, q64), allow_unused=True)
        sp = _shard(p, rank, tp).to(dtype).requires_grad_()
        sq = _shard(q, rank, tp).to(dtype).requires_grad_()
        before = (_bits(sp), _bits(sq))
        res = fn(sp, sq, targets, T, group)
        sum((w[k] * r).sum() for k, r in zip(outs, res)).backward()
        tol = TOL if dtype == torch.float32 else dict(rtol=0, atol=5e-2)
        for k, r in zip(outs, res):
            assert r.dtype == torch.float32 and r.shape == lead, (name, k, r.dtype, r.shape)
            assert torch.isfinite(r).all(), (name, k)
            torch.testing.assert_close(r.double(), ref[k].detach(), **tol, msg=f"{name}:{k} tp={tp} rank={rank}")
        for g, ref_g, x in ((sp.grad, ref_gp, sp), (sq.grad, ref_gq, sq)):
            if ref_g is None or not ref_g.abs().sum():  # that input takes no part in this op
                assert g is None or not g.abs().sum(), name
                continue
            gtol = TOL if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
            torch.testing.assert_close(g.double(), _shard(ref_g, rank, tp), **gtol, msg=f"{name} grad tp={tp}")
            assert (g[torch.isinf(x.detach())] == 0).all(), f"{name}: -inf entries must get zero gradient"
        assert torch.equal(before[0], _bits(sp)) and torch.equal(before[1], _bits(sq)), f"{name} modified logits"


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over all ranks. Each rank's op gives the gradient of the
    (shared) loss on its own shard and zero elsewhere, so the sum is the gradient w.r.t. the full logits."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(g, group=ctx.group)
        return g, None


def gradcheck_float64(rank: int, tp: int, group, lead=(2, 3), T=0.9):
    """torch.autograd.gradcheck of pair_stats and token_stats w.r.t. the full float64 logits.

    Every rank perturbs the same element of the full logits at the same time (gradcheck is deterministic) and
    feeds its shard to the op, so the finite differences see the true global function; the analytical side
    sums the ranks' shard gradients.
    """
    p, q, targets, _ = make_case(7, lead, pad=0, holes=0.0)

    def pair(a, b):
        a, b = _SumGradOverRanks.apply(a, group), _SumGradOverRanks.apply(b, group)
        return tuple(vocab_parallel_pair_stats(_shard(a, rank, tp), _shard(b, rank, tp), targets, group, T))

    def single(a):
        return vocab_parallel_token_stats(_shard(_SumGradOverRanks.apply(a, group), rank, tp), targets, group, T)

    xp, xq = p.double().requires_grad_(), q.double().requires_grad_()
    # Multi-rank: fast mode (random projections of the Jacobian) keeps spawned ranks quick; the seed gives
    # every rank the same projections.
    torch.manual_seed(0)
    assert torch.autograd.gradcheck(pair, (xp, xq), fast_mode=tp > 1)
    assert torch.autograd.gradcheck(single, (xp,), fast_mode=tp > 1)


def check_bf16_close_to_fp32(rank: int, tp: int, group):
    """bf16 logits: same values as float32 on the same (rounded) numbers; gradients to bf16 precision."""
    p, q, targets, _ = make_case(11, (4, 3), pad=2)
    bp, bq = _shard(p, rank, tp).bfloat16().requires_grad_(), _shard(q, rank, tp).bfloat16().requires_grad_()
    fp, fq = bp.detach().float().requires_grad_(), bq.detach().float().requires_grad_()
    outs_b = vocab_parallel_pair_stats(bp, bq, targets, group)
    outs_f = vocab_parallel_pair_stats(fp, fq, targets, group)
    for ob, of in zip(outs_b, outs_f):
        assert ob.dtype == torch.float32
        torch.testing.assert_close(ob, of, **TOL)
    sum(o.sum() for o in outs_b).backward()
    sum(o.sum() for o in outs_f).backward()
    assert bp.grad.dtype == torch.bfloat16
    torch.testing.assert_close(bp.grad.float(), fp.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(bq.grad.float(), fq.grad, rtol=1e-2, atol=1e-2)


def _tp_body(rank: int, tp: int, group, cases: list, extra: bool):
    """All checks at one tensor-parallel size; ``rank`` is the rank inside ``group``."""
    vp.CHUNK_ELEMS = 3 * V  # several chunks per call with a partial last one, like a real 150k vocabulary
    for seed, lead, pad, T in cases:
        check_against_reference(rank, tp, group, seed, lead, pad, T)
    if extra:
        check_against_reference(rank, tp, group, 5, (3, 2), 2, 1.0, dtype=torch.bfloat16)
        check_bf16_close_to_fp32(rank, tp, group)
        gradcheck_float64(rank, tp, group)
    return True


CASES = [(1, (3, 5), 2, 1.0), (2, (7,), 0, 0.7), (3, (2, 3, 2), 3, 1.3)]


def test_tp1_single_process_without_distributed(monkeypatch):
    """group=None with nothing initialised is TP=1, in this very process."""
    assert not torch.distributed.is_initialized()
    monkeypatch.setattr(vp, "CHUNK_ELEMS", 3 * V)
    _tp_body(0, 1, None, CASES, extra=True)


def _four_ranks_body(rank, world_size):
    """TP=4 through megatron's group (group=None), then TP=2 through explicit groups {0, 1} and {2, 3}, which
    must not see each other (the pairs use different logits)."""
    # pad=5: the last rank's whole shard is -inf (the padded tail of the vocabulary)
    _tp_body(rank, 4, None, [(4, (5, 3), 5, 1.0), (6, (1, 1), 2, 0.5)], extra=False)
    pairs = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    pair, r = divmod(rank, 2)
    cases = [(seed + 10 * pair, lead, pad, T) for seed, lead, pad, T in CASES]
    return _tp_body(r, 2, pairs[pair], cases, extra=True)


def test_tp4_megatron_group_and_tp2_explicit_groups_match_reference():
    assert run_multirank(_four_ranks_body, world_size=4, tp=4) == [True] * 4


def test_non_contiguous_logits_and_zero_tokens():
    p, q, targets, _ = make_case(9, (3, 4), pad=1)
    pt = p.transpose(0, 1).requires_grad_()  # [4, 3, V] non-contiguous, like an [s, b, V] -> [b, s, V] view
    lp, ent = vocab_parallel_token_stats(pt, targets.t())
    ref = reference(p.double(), q.double(), targets, 1.0)
    torch.testing.assert_close(lp.t().double(), ref["logp"], **TOL)
    torch.testing.assert_close(ent.t().double(), ref["entropy"], **TOL)
    (lp.sum() + ent.sum()).backward()
    assert pt.grad.shape == pt.shape and torch.isfinite(pt.grad).all()
    one = p[0, 0].clone().requires_grad_()  # a single token: no leading dims at all
    lp1, ent1 = vocab_parallel_token_stats(one, targets[0, 0])
    assert lp1.shape == () and torch.allclose(lp1.double(), ref["logp"][0, 0])
    (lp1 + ent1).backward()
    assert one.grad.shape == (V,)
    empty = torch.zeros(0, 5, V, requires_grad=True)
    lp, ent = vocab_parallel_token_stats(empty, torch.zeros(0, 5, dtype=torch.long))
    assert lp.shape == (0, 5)
    (lp.sum() + ent.sum()).backward()


def test_user_mistakes_raise_value_error():
    logits = torch.randn(2, 3, V)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_log_probs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_log_probs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_entropy(logits, temperature=0.0)
    with pytest.raises(ValueError, match="logits_q"):
        vocab_parallel_kl(logits, torch.randn(2, 3, V + 1))
