"""Token sampling from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds a contiguous shard ``[N, V/tp]`` of the logits (megatron's layout). The sampler
draws from exactly the distribution a single process would draw from on the gathered logits:

- temperature, then top-k, then top-p (the order of Hugging Face's ``generate``), then sampling;
- top-k: the global k-th largest value is found from each shard's local top-k (one all-gather of ``[N, k]``);
- top-p: the nucleus threshold is found from each shard's largest candidates (all-gathers of ``[N, c]``, c
  doubling while the cut-off is not yet inside the exactly-known prefix), then, for rows whose nucleus is wider,
  by a bisection on the threshold value with one all-reduce of ``[N, 2]`` (mass above, count inside) per step;
- sampling by inverse CDF in the global vocabulary order with one counter-based uniform per (seed, row, step):
  the shard masses (one all-gather of ``[N, 2]``) say which shard owns the draw, the owner finds the token in its
  local CDF, one all-reduce hands the token to every rank. The draw depends on (seed, row id, step) only, not on
  the batch composition or the parallel layout, so TP=1 and TP=2 sample the same tokens (up to float rounding).

Log-probs returned are those of the chosen tokens under the distribution sampled from (after temperature,
top-k, top-p), in float32; greedy decoding takes the argmax of the same distribution.

Legend: N rows, Vs = V/tp (this rank's vocabulary shard), tp the tensor-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_NEG_INF = float("-inf")
_CANDIDATES_START = 32
_CANDIDATES_MAX = 256
_BISECTION_MAX_STEPS = 200
_LOG2E = 1.4426950408889634  # log2(e)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. ``greedy`` takes the argmax; otherwise sample after temperature/top-k/top-p."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    max_new_tokens: int = 256
    stop: tuple = field(default_factory=tuple)

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.temperature > 0:
            raise ValueError(f"SamplingParams.temperature must be > 0 (use greedy=True for argmax), "
                             f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1.0 turns it off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {self.stop!r}")


# --- collectives over the tensor-parallel group (no-ops for a single rank) -----------------------------------

class _Shard:
    """This rank's place in the vocabulary: group, size, rank, first global token id of the shard."""

    def __init__(self, width: int, group):
        if group is None and dist.is_initialized():
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                group = parallel_state.get_tensor_model_parallel_group()
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.offset = self.rank * width

    def gather(self, t: torch.Tensor) -> torch.Tensor:  # [*] -> [tp, *]
        if self.size == 1:
            return t[None]
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            t = t.contiguous()
            dist.all_reduce(t, group=self.group)
        return t


# --- counter-based uniforms: one per (seed, row, step), independent of batch order and layout ---------------

_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C1, _C2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic; logical shifts via masks)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _C1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _C2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def uniforms(seed: int, row_ids: torch.Tensor, step) -> torch.Tensor:
    """``[N]`` float64 uniforms in (0, 1) that depend only on (seed, row id, step)."""
    step = torch.as_tensor(step, dtype=torch.int64).expand_as(row_ids)
    z = _mix64(torch.full_like(row_ids, _signed((seed * 0x9E3779B97F4A7C15 + 1) & _M64), dtype=torch.int64))
    z = _mix64(z + row_ids.to(torch.int64) * _GOLDEN)
    z = _mix64(z + step * _C2)
    bits = (z >> 11) & ((1 << 53) - 1)  # 53 random bits
    return (bits.double() + 0.5) * 2.0 ** -53


# --- masks --------------------------------------------------------------------------------------------------

def _apply_top_k(x: torch.Tensor, k: int, shard: _Shard) -> torch.Tensor:
    """Keep the k largest values of each row over the global vocabulary (ties at the k-th value kept)."""
    local = x.topk(min(k, x.shape[-1]), dim=-1).values  # [N, k']
    cands = shard.gather(local).permute(1, 0, 2).reshape(x.shape[0], -1)  # [N, tp*k']
    kth = cands.topk(k, dim=-1).values[:, -1:]  # [N, 1]
    return x.masked_fill(x < kth, _NEG_INF)


def _local_max(x: torch.Tensor):
    """Row maxima (float64, -inf for a fully masked shard) and a finite copy to subtract before exp."""
    m = x.amax(dim=-1).double()  # [N]
    return m, torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _shifted_exp(x: torch.Tensor, m_safe: torch.Tensor) -> torch.Tensor:
    """``exp(x - max)`` ``[N, Vs]`` in float32, the logits' own precision (values in [0, 1]). Callers sum it
    in float32 within blocks of 128 and in float64 across blocks (``_mass``, ``_search``), so no token's mass is
    lost to accumulation over a large vocabulary; float64 over all of ``[N, Vs]`` dominated sampling at decode.

    Computed as ``exp2((x - max) * log2(e))``: torch's CPU ``exp`` takes a slow path wherever its result
    underflows (the -inf of banned tokens and top-k / top-p masks: ~3x; logits more than ~87 below the row's
    maximum: 10-30x), ``exp2`` does not and is ~3x faster on ordinary values too. The multiply's rounding
    changes a token's mass by < 5e-7 relative within e^-10 of the maximum (the sums and the draws by less)."""
    return (x - m_safe.to(x.dtype)[:, None]).mul_(_LOG2E).exp2_()  # in place: one [N, Vs] buffer


_BLOCK = 128


def _mass(e: torch.Tensor) -> torch.Tensor:
    """Row sums ``[N]`` float64 of ``e`` ``[N, Vs]``: float32 within blocks, float64 across (as the sampler)."""
    return _blocks(e).sum(-1).sum(-1, dtype=torch.float64)


def _blocks(e: torch.Tensor) -> torch.Tensor:
    """``[N, Vs]`` -> ``[N, nb, B]`` (zero mass padded at the end when B does not divide Vs)."""
    n, width = e.shape
    if width % _BLOCK:
        e = torch.nn.functional.pad(e, (0, _BLOCK - width % _BLOCK))
    return e.view(n, -1, _BLOCK)


def _search(blocks: torch.Tensor, cum: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """First local index whose cumulative mass exceeds t ``[N]`` (float64), as a full-vocabulary cumsum would
    find it, but scanning one block per row: find the block from the block sums, then cumsum inside it."""
    rows = torch.arange(blocks.shape[0])
    j = torch.searchsorted(cum, t[:, None].contiguous(), right=True).squeeze(-1).clamp_(max=cum.shape[1] - 1)
    inner = blocks[rows, j]  # [N, B]
    start = torch.where(j > 0, cum[rows, (j - 1).clamp(min=0)], torch.zeros_like(t))  # mass before block j
    inner_cdf = start[:, None] + inner.double().cumsum(-1)  # [N, B]
    k = torch.searchsorted(inner_cdf, t[:, None].contiguous(), right=True).squeeze(-1)
    # t in the rounding gap between the block sum and the in-block cumsum: the block's last token with mass
    last = torch.where(inner > 0, torch.arange(inner.shape[1]), torch.zeros_like(k)[:, None]).amax(-1)
    k = torch.where(k >= inner.shape[1], last, k)
    return j * blocks.shape[2] + k


def _logsumexp(x: torch.Tensor, shard: _Shard) -> torch.Tensor:
    """Global log-sum-exp per row, float64 ``[N]``."""
    m, m_safe = _local_max(x)
    s = _mass(_shifted_exp(x, m_safe))
    ms = shard.gather(torch.stack([m, s], -1))  # [tp, N, 2]
    gm = ms[..., 0].amax(0)
    return gm + torch.log((ms[..., 1] * torch.exp(ms[..., 0] - gm)).sum(0))


def _top_p_threshold_from_candidates(x, p, lse, shard):
    """Nucleus threshold from the shards' largest values. Returns (threshold [N], decided [N], bound [N]).

    A token is kept when the mass of the tokens ranked before it is < p (Hugging Face's rule). Gathering the c
    largest values of every shard gives the global order exactly for values above ``bound`` (the largest of the
    shards' c-th values); the row is decided once that exact prefix already holds mass >= p.
    """
    n, width = x.shape
    c = min(_CANDIDATES_START, width)
    while True:
        local = x.topk(c, dim=-1).values  # [N, c] descending
        g = shard.gather(local)  # [tp, N, c]
        bound = g[..., -1].amax(0) if c < width else torch.full((n,), _NEG_INF)  # [N]
        cand = g.permute(1, 0, 2).reshape(n, -1).sort(dim=-1, descending=True).values  # [N, tp*c]
        prob = torch.exp(cand.double() - lse[:, None])
        exact = cand > bound[:, None]
        before = torch.cumsum(prob, -1) - prob  # mass strictly before each candidate
        kept = exact & (before < p)
        decided = (prob * exact).sum(-1) >= p
        if c == width:
            decided = torch.ones_like(decided)
        # smallest kept value (the largest value is always kept)
        threshold = torch.where(kept, cand, torch.full_like(cand, float("inf"))).amin(-1)
        if bool(decided.all()) or c >= min(width, _CANDIDATES_MAX):
            return threshold, decided, bound
        c = min(2 * c, width)


def _top_p_threshold_by_bisection(x, p, lse, hi, shard):
    """Threshold for rows whose nucleus is wider than the candidates: bisection on the value.

    Invariants per row: mass(x > lo) >= p, mass(x > hi) < p. When no token lies strictly between lo and hi the
    kept set is {x >= hi}. ``hi`` starts at the candidate bound (mass above it < p).
    """
    xd = x.double()
    finite = torch.isfinite(xd)
    lo_local = torch.where(finite, xd, torch.full_like(xd, float("inf"))).amin(-1)
    lo = -shard.gather(-lo_local).amax(0) - 1.0  # below the global minimum: mass above it is 1 >= p
    hi = hi.double().clone()
    done = torch.zeros_like(hi, dtype=torch.bool)
    prob = torch.exp(xd - lse[:, None])  # [N, Vs]
    for _ in range(_BISECTION_MAX_STEPS):
        mid = 0.5 * (lo + hi)
        stats = torch.stack([
            (prob * (xd > mid[:, None])).sum(-1),
            ((xd > lo[:, None]) & (xd < hi[:, None])).sum(-1).double(),
        ], -1)
        stats = shard.all_sum(stats)  # [N, 2]
        done |= stats[:, 1] == 0
        if bool(done.all()):
            break
        up = (stats[:, 0] >= p) & ~done
        lo = torch.where(up, mid, lo)
        hi = torch.where(~up & ~done, mid, hi)
    return hi


def _apply_top_p(x: torch.Tensor, p: float, shard: _Shard) -> torch.Tensor:
    lse = _logsumexp(x, shard)
    threshold, decided, bound = _top_p_threshold_from_candidates(x, p, lse, shard)
    if not bool(decided.all()):
        rows = (~decided).nonzero().squeeze(-1)
        threshold = threshold.double()
        threshold[rows] = _top_p_threshold_by_bisection(x[rows], p, lse[rows], bound[rows], shard)
    return x.masked_fill(x.double() < threshold[:, None], _NEG_INF)


def processed_logits(logits: torch.Tensor, params: SamplingParams, vocab_size: int | None = None,
                     group=None) -> torch.Tensor:
    """Logits of the sampling distribution on this shard, float32 ``[N, Vs]``: temperature, vocabulary padding
    masked (global ids >= vocab_size), top-k and top-p masked with -inf."""
    shard = _Shard(logits.shape[-1], group)
    return _processed(logits, params, vocab_size, shard)


def _processed(logits, params, vocab_size, shard):
    x = logits.float()  # [N, Vs]; the caller's own tensor when already float32: never written in place
    if params.temperature != 1.0:
        x = x / params.temperature
    if vocab_size is not None and shard.offset + x.shape[-1] > vocab_size:
        pad = slice(max(0, vocab_size - shard.offset), None)  # this shard's columns past the vocabulary
        if not bool(torch.isneginf(x[:, pad]).all()):  # the model usually masked them already
            x = x.clone() if x is logits else x
            x[:, pad] = _NEG_INF
    total = vocab_size if vocab_size is not None else x.shape[-1] * shard.size
    if 0 < params.top_k < total:
        x = _apply_top_k(x, params.top_k, shard)
    if params.top_p < 1.0:
        x = _apply_top_p(x, params.top_p, shard)
    return x


# --- drawing ------------------------------------------------------------------------------------------------

def _greedy(x: torch.Tensor, shard: _Shard):
    idx = x.argmax(dim=-1)  # first maximum on this shard
    m, m_safe = _local_max(x)
    s = _mass(_shifted_exp(x, m_safe))
    g = shard.gather(torch.stack([m, s, (idx + shard.offset).double()], -1))  # [tp, N, 3]
    best = g[..., 0].argmax(0)  # first rank holding the global maximum = lowest token id among ties
    gm = g[..., 0].amax(0)
    lse = gm + torch.log((g[..., 1] * torch.exp(g[..., 0] - gm)).sum(0))
    token = g[..., 2].gather(0, best[None]).squeeze(0).long()
    return token, (gm - lse).float()


def _inverse_cdf(x: torch.Tensor, u: torch.Tensor, shard: _Shard):
    """Draw token = first global id whose cumulative probability exceeds u, in global vocabulary order."""
    m, m_safe = _local_max(x)
    e = _shifted_exp(x, m_safe)  # [N, Vs] local, unnormalised
    blocks = _blocks(e)  # [N, nb, B]
    # [N, nb] mass up to the end of each block: float32 sums of B values in [0, 1] (relative error ~1e-7, the
    # logits' own precision), float64 across blocks; casting all of e to float64 cost more than the rest
    cum = blocks.sum(-1).double().cumsum(-1)
    g = shard.gather(torch.stack([m, cum[:, -1]], -1))  # [tp, N, 2]
    gm = g[..., 0].amax(0)
    mass = g[..., 1] * torch.exp(g[..., 0] - gm)  # [tp, N] shard masses, same scale on every rank
    total = mass.sum(0)
    before = torch.cumsum(mass, 0) - mass  # [tp, N]
    target = u * total  # [N]
    owner = ((before <= target[None]) & (mass > 0)).long().cumsum(0).argmax(0)  # last shard starting <= target
    mine = owner == shard.rank
    local_t = (target - before[shard.rank]) * torch.exp(gm - m_safe)  # into this shard's unnormalised scale
    local_t = torch.where(mine, local_t, torch.zeros_like(local_t))
    local_t = torch.minimum(local_t, torch.nextafter(cum[:, -1], torch.zeros_like(local_t)))
    idx = _search(blocks, cum, local_t).clamp_(max=x.shape[-1] - 1)
    val = x.gather(-1, idx[:, None]).squeeze(-1).double()
    picked = torch.stack([(idx + shard.offset).double(), val], -1)
    picked = torch.where(mine[:, None], picked, torch.zeros_like(picked))
    picked = shard.all_sum(picked)  # [N, 2] from the owner
    lse = gm + torch.log(total)
    return picked[:, 0].long(), (picked[:, 1] - lse).float()


def sample(logits: torch.Tensor, params: SamplingParams, *, seed: int, row_ids: torch.Tensor, step,
           vocab_size: int | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from vocab-parallel logits.

    logits ``[N, Vs]`` this rank's shard; row_ids ``[N]`` stable ids of the sequences (their random streams);
    step: the token's index in the response (int or ``[N]``). Returns (tokens ``[N]`` int64 global ids,
    log-probs ``[N]`` float32 under the sampling distribution), identical on every rank of the group.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits [N, V/tp], got shape {tuple(logits.shape)}")
    shard = _Shard(logits.shape[-1], group)
    x = _processed(logits, params, vocab_size, shard)
    if params.greedy:
        return _greedy(x, shard)
    return _inverse_cdf(x, uniforms(seed, row_ids, step), shard)


def log_probs_of(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams,
                 vocab_size: int | None = None, group=None) -> torch.Tensor:
    """Log-probs ``[N]`` of given global token ids under the sampling distribution (teacher forcing)."""
    shard = _Shard(logits.shape[-1], group)
    x = _processed(logits, params, vocab_size, shard)
    lse = _logsumexp(x, shard)
    local = tokens - shard.offset
    mine = (local >= 0) & (local < x.shape[-1])
    val = x.gather(-1, local.clamp(0, x.shape[-1] - 1)[:, None]).squeeze(-1).double()
    val = shard.all_sum(torch.where(mine, val, torch.zeros_like(val)))
    return (val - lse).float()


__all__ = ["SamplingParams", "log_probs_of", "processed_logits", "sample", "uniforms"]
