"""Vocab-parallel sampler: masks equal Hugging Face's warpers, draws follow the reference distribution
(chi-square), TP=2 equals TP=1, seeds reproduce."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from megatron_papo.rollout.sampling import SamplingParams, log_probs_of, processed_logits, sample, uniforms

CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.3),  # nucleus found among the shards' candidates
    SamplingParams(temperature=1.0, top_p=0.97),  # nucleus wider than the candidates: bisection
    SamplingParams(temperature=0.9, top_k=300, top_p=0.9),
]


def _hf_reference(logits: torch.Tensor, params: SamplingParams, vocab_size: int) -> torch.Tensor:
    """Hugging Face generate's processing on the gathered logits (float64), padding columns removed."""
    x = logits[:, :vocab_size].double()
    x = TemperatureLogitsWarper(params.temperature)(None, x)
    if params.top_k:
        x = TopKLogitsWarper(params.top_k)(None, x)
    if params.top_p < 1:
        x = TopPLogitsWarper(params.top_p)(None, x)
    return x


def _logits(n=6, v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2.0


def _check_against_hf(logits, shard_logits, vocab_size, group=None):
    for params in CASES:
        ref = _hf_reference(logits, params, vocab_size)
        got = processed_logits(shard_logits, params, vocab_size=vocab_size, group=group)
        if group is not None:
            got = _gather_cols(got, group)
        got = got[:, :vocab_size]
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), params
        ref_lp = torch.log_softmax(ref, -1)
        tokens = ref.argsort(-1, descending=True)[:, 1]  # a kept token other than the top one
        lp = log_probs_of(shard_logits, tokens, params, vocab_size=vocab_size, group=group)
        torch.testing.assert_close(lp.double(), ref_lp.gather(-1, tokens[:, None]).squeeze(-1), atol=1e-5,
                                   rtol=1e-5)


def _gather_cols(t, group):
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat(out, -1)


def test_masks_and_log_probs_match_hf_tp1():
    logits = _logits()
    _check_against_hf(logits, logits, vocab_size=997)  # 3 padding columns must never be chosen


def _chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson statistic over the support and the 1e-4 upper quantile (Wilson-Hilferty)."""
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token with zero probability"
    exp = probs[support] * n
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    dof = int(support.sum()) - 1
    z = 3.719  # one-sided 1e-4 normal quantile
    q = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat, q


SMALL_V, SMALL_PAD = 9, 10  # true vocabulary 9 padded to 10 columns (5 per rank at TP=2)
CHI_CASES = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_p=0.8),
             SamplingParams(temperature=1.2, top_k=4)]
DRAWS = 40000


def _small_logits():
    return torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, 1.5, -1.0, 0.7, 0.3, 9.0]])  # last column is padding


def _draw(shard_logits, params, seed, group=None):
    rows = torch.arange(DRAWS)
    tokens, lps = sample(shard_logits.expand(DRAWS, -1), params, seed=seed, row_ids=rows, step=3,
                         vocab_size=SMALL_V, group=group)
    return tokens, lps


def _check_draws(tokens, lps, params):
    ref = _hf_reference(_small_logits(), params, SMALL_V)[0]
    probs = torch.softmax(ref, -1)
    counts = torch.bincount(tokens, minlength=SMALL_PAD).double()
    assert counts[SMALL_V:].sum() == 0
    stat, q = _chi_square_ok(counts[:SMALL_V], probs)
    assert stat < q, (params, stat, q)
    torch.testing.assert_close(lps.double(), torch.log(probs[tokens]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", CHI_CASES, ids=["temp", "top_p", "top_k"])
def test_chi_square_tp1(params):
    tokens, lps = _draw(_small_logits(), params, seed=11)
    _check_draws(tokens, lps, params)


def test_seed_reproduces_and_rows_are_independent_of_batch_order():
    logits = _logits(n=8, v=50)
    rows = torch.arange(100, 108)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    a, la = sample(logits, p, seed=5, row_ids=rows, step=7)
    b, lb = sample(logits, p, seed=5, row_ids=rows, step=7)
    assert torch.equal(a, b) and torch.equal(la, lb)
    perm = torch.randperm(8)
    c, _ = sample(logits[perm], p, seed=5, row_ids=rows[perm], step=7)
    assert torch.equal(c, a[perm])  # a row's draw depends on its id, not its place in the batch
    draws = torch.stack([sample(logits, p, seed=s, row_ids=rows, step=7)[0] for s in range(6)])
    assert (draws != draws[0]).any(), "different seeds must give different samples"
    u = uniforms(3, torch.arange(20000), 0)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_greedy_ties_lowest_id_and_log_prob():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 0.0, 0.0, 0.0]])
    tok, lp = sample(logits, SamplingParams(greedy=True, temperature=2.0), seed=0, row_ids=torch.arange(2), step=0)
    assert tok.tolist() == [1, 0]
    torch.testing.assert_close(lp, torch.log_softmax(logits / 2.0, -1)[torch.arange(2), tok])


def test_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)


def _tp2_body(rank, world_size):
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    logits = _logits()  # 1000 columns, 500 per rank
    shard = logits.chunk(2, -1)[rank]
    _check_against_hf(logits, shard, vocab_size=997, group=group)
    # same draws as a single process on the gathered logits
    import torch.distributed as dist

    solo = [dist.new_group([r]) for r in range(world_size)][rank]  # single-process reference on this rank
    rows = torch.arange(6)
    for params in CASES + [SamplingParams(greedy=True)]:
        t1, l1 = sample(logits, params, seed=9, row_ids=rows, step=2, vocab_size=997, group=solo)
        t2, l2 = sample(shard, params, seed=9, row_ids=rows, step=2, vocab_size=997, group=group)
        assert torch.equal(t1, t2), params
        torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    small = _small_logits().chunk(2, -1)[rank]
    out = []
    for params in CHI_CASES:
        tokens, lps = _draw(small, params, seed=11, group=group)
        _check_draws(tokens, lps, params)
        out.append(tokens)
    return [t.tolist() for t in out]


def test_tp2_matches_gathered_and_tp1(multirank):
    results = multirank(_tp2_body, world_size=2, tp=2)
    assert results[0] == results[1], "every rank of the group must return the same tokens"
    for params, tokens in zip(CHI_CASES, results[0]):
        t1, _ = _draw(_small_logits(), params, seed=11)
        same = (torch.tensor(tokens) == t1).double().mean()
        assert same > 0.999, (params, same)  # identical draws up to float rounding at CDF boundaries


def test_block_search_finds_the_full_cumsum_index():
    """The sampler finds its token from 128-token block sums then one block's cumsum: same index as a search
    over the whole vocabulary's cumulative mass (odd widths, -inf tokens, peaked and flat rows)."""
    from megatron_papo.rollout import sampling as S

    g = torch.Generator().manual_seed(3)
    for width in (7, 128, 300, 4099):
        for scale in (0.5, 3.0, 20.0):
            x = torch.randn(16, width, generator=g) * scale
            x[:, torch.randint(0, width, (width // 5,), generator=g)] = float("-inf")
            _, m_safe = S._local_max(x)
            e = S._shifted_exp(x, m_safe)
            blocks = S._blocks(e)
            cum = blocks.sum(-1).double().cumsum(-1)
            t = torch.rand(16, dtype=torch.float64, generator=g) * cum[:, -1]
            got = S._search(blocks, cum, t)
            want = torch.searchsorted(e.double().cumsum(-1), t[:, None].contiguous(), right=True).squeeze(-1)
            assert torch.equal(got, want), (width, scale)
            assert torch.isfinite(x.gather(-1, got[:, None])).all()


def test_shifted_exp_equals_float64_exp():
    """The sampler's exp (as exp2 of the scaled difference): against float64 exp, on near-maximum, far and
    underflowing logits and -inf masks; -inf gives exactly 0, the maximum exactly 1."""
    from megatron_papo.rollout import sampling as S

    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(8, 200, generator=g) * 3, -torch.rand(8, 100, generator=g) * 150,
                   torch.full((8, 10), float("-inf"))], 1)
    m, m_safe = S._local_max(x)
    got, want = S._shifted_exp(x, m_safe).double(), (x.double() - m[:, None]).exp()
    near = (x.double() - m[:, None]) > -10
    assert float(((got - want).abs() / want)[near].max()) < 1e-6
    assert float((got - want).abs().max()) < 1e-6 and bool((got[:, -10:] == 0).all())
    assert bool((got.amax(-1) == 1).all())
