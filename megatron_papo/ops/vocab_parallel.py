"""Log-prob, entropy and exact KL on vocab-parallel logits, without gathering the vocabulary.

Shape legend: ``N`` tokens (every leading dim flattened), ``Vl = V / tp`` this rank's contiguous vocabulary
shard ``[rank * Vl, (rank + 1) * Vl)`` (megatron's layout), ``C`` the tokens of one chunk.

One autograd function does all of it. Forward walks the tokens in chunks of about ``CHUNK_ELEMS`` logits, keeps
per-token statistics relative to the *local* row max (sum of exp, sum of exp times shifted logit, the target's
logit), then rescales them to the global max after one all-reduce MAX and sums them with one all-reduce SUM
(the "online softmax" combination, Milakov & Gimelshein 2018). Backward saves only the input logits and
per-token statistics (log-sum-exp, entropy, KL) and recomputes probabilities chunk by chunk, so the extra
memory is a few chunk buffers, never a full-vocabulary copy. Backward needs no communication: each rank gets
the gradient of one loss on its own shard (megatron's convention for ``vocab_parallel_cross_entropy``).

Numerics: everything is accumulated in float32 (float64 for float64 inputs). Shifted logits are clamped at
``FLOOR`` before use: ``exp(FLOOR)`` is exactly 0 in both float32 and float64, so an entry that far below the
row max contributes exactly what it would unclamped (nothing), while ``-inf`` entries (masked or padded
vocabulary) give ``0 * FLOOR = 0`` instead of ``0 * -inf = NaN``, and a zero gradient. Rows need at least one
finite logit somewhere in the (global) vocabulary.

Logits whose leading dims cannot be flattened as a view (non-contiguous, e.g. a transposed ``[s, b, V]``) are
copied once in forward and once in backward; pass contiguous logits on the hot path (megatron's are).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_papo.ops._comm import TPGroup, resolve_tp_group

FLOOR = -1.0e4
# Stand-in for the max of a shard whose row is all -inf: finite, so (local_max - global_max) * 0 stays 0.
_EMPTY_MAX = -1.0e30
# Logits per chunk buffer. On CPU 1 MiB of float32 (one row of a 150k vocabulary): the few chunk buffers stay
# in L2, which measured 1.3-1.7x faster than 16 MiB chunks. On an accelerator 64 MiB, enough work per kernel
# launch; either is small against a real logits tensor.
CHUNK_ELEMS = 1 << 18
ACCEL_CHUNK_ELEMS = 1 << 24

_OUTPUTS = ("logp", "entropy", "logq", "kl")


class PairStats(NamedTuple):
    """Per-token results of :func:`vocab_parallel_pair_stats`, each ``[...]``."""

    log_probs: torch.Tensor  # log p(target)
    entropy: torch.Tensor  # H(p)
    log_probs_q: torch.Tensor  # log q(target)
    kl: torch.Tensor  # KL(p || q)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_rows(x: torch.Tensor) -> int:
    elems = CHUNK_ELEMS if x.device.type == "cpu" else ACCEL_CHUNK_ELEMS
    return max(1, min(x.shape[0], elems // x.shape[1]))


def _chunks(x: torch.Tensor):
    rows = _chunk_rows(x)
    for s in range(0, x.shape[0], rows):
        yield s, min(s + rows, x.shape[0])


def _shift_by_local_max(x: torch.Tensor, out: torch.Tensor, temperature: float) -> torch.Tensor:
    """``out = clamp((x - rowmax(x)) / T, FLOOR)``; returns ``rowmax(x) / T`` (C,). ``x`` is only read."""
    m = x.amax(-1, keepdim=True).to(out.dtype).clamp_min_(_EMPTY_MAX)  # (C, 1)
    torch.sub(x, m, out=out)  # promotes bf16/fp16 to the float32 buffer without an intermediate copy
    if temperature != 1.0:
        out.div_(temperature)
        m = m / temperature
    out.clamp_min_(FLOOR)
    return m.squeeze(-1)


def _shift_by(x: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, temperature: float) -> torch.Tensor:
    """``out = clamp(x / T - lse, FLOOR)``: log-probabilities of one chunk. ``x`` is only read."""
    torch.sub(x, (lse * temperature).unsqueeze(-1), out=out)
    if temperature != 1.0:
        out.div_(temperature)
    return out.clamp_min_(FLOOR)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` without materialising the product. (C, Vl), (C, Vl) -> (C,)"""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _local_targets(targets: torch.Tensor, tp: TPGroup, vl: int):
    """Global ids (N,) -> (index into this shard clamped to it, whether this shard owns the id)."""
    local = targets - tp.rank * vl
    owned = (local >= 0) & (local < vl)
    return local.clamp(0, vl - 1), owned


def _local_stats(p, q, local_t, want: set, temperature: float) -> dict:
    """One pass over this rank's shard(s): per-token statistics relative to the local max. p, q: (N, Vl)."""
    n, vl = p.shape
    cd = _compute_dtype(p)
    keys = ["mp", "sp"] + ["ap"] * ("entropy" in want) + ["tp"] * ("logp" in want)
    if q is not None:
        keys += ["mq", "sq"] + ["dpq"] * ("kl" in want) + ["tq"] * ("logq" in want)
    st = {k: torch.empty(n, dtype=cd, device=p.device) for k in keys}
    ws = [torch.empty(_chunk_rows(p), vl, dtype=cd, device=p.device) for _ in range(2 if q is None else 3)]
    for s, e in _chunks(p):
        sh_p, exp_p = ws[0][: e - s], ws[1][: e - s]  # (C, Vl) each
        st["mp"][s:e] = m = _shift_by_local_max(p[s:e], sh_p, temperature)
        if "tp" in st:
            st["tp"][s:e] = sh_p.gather(1, local_t[s:e, None]).squeeze(1) + m
        torch.exp(sh_p, out=exp_p)
        st["sp"][s:e] = exp_p.sum(-1)
        if "ap" in st:
            st["ap"][s:e] = _rowdot(exp_p, sh_p)
        if q is None:
            continue
        sh_q = ws[2][: e - s]
        st["mq"][s:e] = m = _shift_by_local_max(q[s:e], sh_q, temperature)
        if "tq" in st:
            st["tq"][s:e] = sh_q.gather(1, local_t[s:e, None]).squeeze(1) + m
        if "dpq" in st:
            st["dpq"][s:e] = _rowdot(exp_p, torch.sub(sh_p, sh_q, out=sh_p))
        st["sq"][s:e] = torch.exp_(sh_q).sum(-1)
    return st


def _global_stats(st: dict, owned, tp: TPGroup) -> dict:
    """Rescale the local statistics to the global max and sum them over the group (two all-reduces)."""
    has_q = "mq" in st
    m = tp.all_reduce_max(torch.stack([st["mp"], st["mq"]] if has_q else [st["mp"]]))  # (1|2, N)
    dp = st["mp"] - m[0]  # <= 0; -1e30 for a shard whose row is all -inf (then sp == 0)
    scale_p = torch.exp(dp)
    sums = {"sp": st["sp"] * scale_p}
    if "ap" in st:
        sums["ap"] = scale_p * (st["ap"] + dp * st["sp"])
    for k in ("tp", "tq"):
        if k in st:
            sums[k] = torch.where(owned, st[k], torch.zeros_like(st[k]))
    if has_q:
        dq = st["mq"] - m[1]
        sums["sq"] = st["sq"] * torch.exp(dq)
        if "dpq" in st:
            sums["dpq"] = scale_p * (st["dpq"] + (dp - dq) * st["sp"])
    names = list(sums)
    reduced = tp.all_reduce_sum(torch.stack([sums[k] for k in names]))  # (K, N)
    out = dict(zip(names, reduced))
    out["mp"] = m[0]
    if has_q:
        out["mq"] = m[1]
    return out


def _finish(g: dict, want: set) -> dict:
    """Per-token results from the global statistics."""
    log_sp = torch.log(g["sp"])
    res = {"lse_p": g["mp"] + log_sp}
    if "logp" in want:
        res["logp"] = g["tp"] - res["lse_p"]
    if "entropy" in want:
        res["entropy"] = log_sp - g["ap"] / g["sp"]
    if "mq" in g:
        log_sq = torch.log(g["sq"])
        res["lse_q"] = g["mq"] + log_sq
        if "logq" in want:
            res["logq"] = g["tq"] - res["lse_q"]
        if "kl" in want:
            res["kl"] = g["dpq"] / g["sp"] - log_sp + log_sq
    return res


def _grad_chunk(buf: torch.Tensor, out: torch.Tensor, local_t, owned, g_t, span, temperature: float):
    """Finish rows ``span`` of a gradient in ``buf``: + g_t at the owned targets, / T, written into ``out``."""
    if g_t is not None:
        s, e = span
        g_t = torch.where(owned[s:e], g_t, torch.zeros_like(g_t))
        buf.scatter_add_(1, local_t[s:e, None], g_t[:, None])
    if temperature != 1.0:
        buf.div_(temperature)
    if buf.data_ptr() != out.data_ptr():
        out.copy_(buf)


def _backward_chunks(ctx, p, q, local_t, owned, saved: dict, g: dict, need_p: bool, need_q: bool):
    """Recompute p (and q) chunk by chunk and write d loss / d logits into fresh (N, Vl) gradients.

    With lp = log p, lq = log q (this shard), per token:
      d logp / dzp = onehot - p          d H / dzp = -p (lp + H)
      d KL / dzp   = p (lp - lq - KL)    d KL / dzq = q - p          d logq / dzq = onehot - q
    """
    n, vl = p.shape
    cd, temp = _compute_dtype(p), ctx.temperature
    zero = torch.zeros(n, dtype=cd, device=p.device)
    g_lp, g_h, g_lq, g_kl = (g.get(k) for k in _OUTPUTS)
    need_p = need_p and (g_lp is not None or g_h is not None or g_kl is not None)
    need_q = need_q and (g_lq is not None or g_kl is not None)
    use_q = need_q or (need_p and g_kl is not None)  # lq is needed
    # grad_p = p * (a * lp + b * lq + c) + g_lp * onehot
    a = (g_kl if g_kl is not None else zero) - (g_h if g_h is not None else zero)
    c = -(g_lp if g_lp is not None else zero)
    if g_h is not None:
        c = c - g_h * saved["entropy"]
    if g_kl is not None:
        c = c - g_kl * saved["kl"]
    grad_p = torch.empty_like(p) if need_p else None  # (N, Vl)
    grad_q = torch.empty_like(q) if need_q else None
    ws = [torch.empty(_chunk_rows(p), vl, dtype=cd, device=p.device)
          for _ in range(2 + use_q + (need_q and q.dtype != cd))]
    for s, e in _chunks(p):
        lp, prob_p = ws[0][: e - s], ws[1][: e - s]  # (C, Vl)
        torch.exp(_shift_by(p[s:e], saved["lse_p"][s:e], lp, temp), out=prob_p)
        if use_q:
            lq = _shift_by(q[s:e], saved["lse_q"][s:e], ws[2][: e - s], temp)
        if need_q:
            # grad_q = q * (g_kl - g_lq) - g_kl * p + g_lq * onehot
            gq = grad_q[s:e] if grad_q.dtype == cd else ws[3][: e - s]
            gk = g_kl[s:e, None] if g_kl is not None else zero[s:e, None]
            coef = gk - (g_lq[s:e, None] if g_lq is not None else 0.0)
            torch.exp(lq, out=gq).mul_(coef).addcmul_(prob_p, gk, value=-1.0)
            _grad_chunk(gq, grad_q[s:e], local_t, owned, None if g_lq is None else g_lq[s:e], (s, e), temp)
        if need_p:
            lp.mul_(a[s:e, None]).add_(c[s:e, None])
            if g_kl is not None:
                lp.addcmul_(lq, g_kl[s:e, None], value=-1.0)
            gp = grad_p[s:e] if grad_p.dtype == cd else lp
            torch.mul(lp, prob_p, out=gp)
            _grad_chunk(gp, grad_p[s:e], local_t, owned, None if g_lp is None else g_lp[s:e], (s, e), temp)
    return grad_p, grad_q


class _VocabParallelStats(torch.autograd.Function):
    """Any subset of (log p(target), H(p), log q(target), KL(p||q)) from sharded logits p, q."""

    @staticmethod
    def forward(ctx, logits_p, logits_q, targets, tp: TPGroup, temperature: float, names: tuple):
        vl = logits_p.shape[-1]
        lead = logits_p.shape[:-1]
        p = logits_p.reshape(-1, vl)  # (N, Vl); a view for contiguous logits
        q = None if logits_q is None else logits_q.reshape(-1, vl)
        want = set(names)
        local_t = owned = None
        if targets is not None:
            local_t, owned = _local_targets(targets.reshape(-1), tp, vl)
        stats = _local_stats(p, q, local_t, want, temperature)
        res = _finish(_global_stats(stats, owned, tp), want)
        ctx.names, ctx.temperature = names, temperature
        ctx.save_for_backward(logits_p, logits_q, local_t, owned, res["lse_p"], res.get("lse_q"),
                              res.get("entropy"), res.get("kl"))
        ctx.set_materialize_grads(False)
        return tuple(res[k].view(lead) for k in names)

    @staticmethod
    def backward(ctx, *grads):
        logits_p, logits_q, local_t, owned, lse_p, lse_q, entropy, kl = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = {k: gr.reshape(-1).to(lse_p.dtype) for k, gr in zip(ctx.names, grads) if gr is not None}
        if not g or not (need_p or need_q):
            return None, None, None, None, None, None
        vl = logits_p.shape[-1]
        p = logits_p.reshape(-1, vl)
        q = None if logits_q is None else logits_q.reshape(-1, vl)
        saved = {"lse_p": lse_p, "lse_q": lse_q, "entropy": entropy, "kl": kl}
        grad_p, grad_q = _backward_chunks(ctx, p, q, local_t, owned, saved, g, need_p, need_q)
        # A None gradient (that input's outputs were unused) is fine for autograd.
        return (None if grad_p is None else grad_p.view(logits_p.shape),
                None if grad_q is None else grad_q.view(logits_q.shape), None, None, None, None)


def _check(name: str, logits: torch.Tensor, targets: torch.Tensor | None, temperature: float):
    if not torch.is_floating_point(logits):
        raise ValueError(f"{name}: logits must be a floating-point tensor [..., V/tp], got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name}: logits must have a non-empty vocabulary dim [..., V/tp], got {tuple(logits.shape)}")
    if targets is not None:
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"{name}: targets {tuple(targets.shape)} must have the logits' leading shape "
                             f"{tuple(logits.shape[:-1])} (one global token id per position)")
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError(f"{name}: targets must hold integer token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def _run(logits_p, logits_q, targets, group, temperature, names):
    tp = resolve_tp_group(group)
    return _VocabParallelStats.apply(logits_p, logits_q, targets, tp, float(temperature), names)


def vocab_parallel_log_probs(logits, targets, group=None, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per token. logits [..., V/tp] (this rank's shard), targets [...] global ids.

    Returns [...] float32 (float64 for float64 logits), identical on every rank of ``group``. Targets are not
    range-checked (that would cost a device sync): mask positions whose id is outside [0, V) yourself.
    """
    _check("vocab_parallel_log_probs", logits, targets, temperature)
    return _run(logits, None, targets, group, temperature, ("logp",))[0]


def vocab_parallel_entropy(logits, group=None, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) over the full vocabulary, per token. logits [..., V/tp] -> [...]."""
    _check("vocab_parallel_entropy", logits, None, temperature)
    return _run(logits, None, None, group, temperature, ("entropy",))[0]


def vocab_parallel_kl(logits_p, logits_q, group=None, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(p || q) over the full vocabulary per token, p = softmax(logits_p / T), q = softmax(logits_q / T).

    logits_p, logits_q [..., V/tp] -> [...]; differentiable in whichever inputs require grad.
    """
    _check("vocab_parallel_kl", logits_p, None, temperature)
    if logits_q.shape != logits_p.shape:
        raise ValueError(f"vocab_parallel_kl: logits_q {tuple(logits_q.shape)} must have the shape of logits_p "
                         f"{tuple(logits_p.shape)} (same tokens, same vocabulary shard)")
    return _run(logits_p, logits_q, None, group, temperature, ("kl",))[0]


def vocab_parallel_token_stats(logits, targets, group=None, temperature: float = 1.0):
    """``(log_probs, entropy)`` per token from one pass over the logits: the trainer's hot path."""
    _check("vocab_parallel_token_stats", logits, targets, temperature)
    return _run(logits, None, targets, group, temperature, ("logp", "entropy"))


def vocab_parallel_pair_stats(logits_p, logits_q, targets, group=None, temperature: float = 1.0) -> PairStats:
    """log p(target), H(p), log q(target) and KL(p || q) from one pass over both logits (PAPO: p with the real
    image, q with the masked one).

    Same results as the separate functions, but one autograd node per input: when several of them feed the
    gradient of the same logits, autograd would hold a second full gradient while it sums them; this does not.
    """
    _check("vocab_parallel_pair_stats", logits_p, targets, temperature)
    if logits_q.shape != logits_p.shape:
        raise ValueError(f"vocab_parallel_pair_stats: logits_q {tuple(logits_q.shape)} must have the shape of "
                         f"logits_p {tuple(logits_p.shape)}")
    return PairStats(*_run(logits_p, logits_q, targets, group, temperature, ("logp", "entropy", "logq", "kl")))
