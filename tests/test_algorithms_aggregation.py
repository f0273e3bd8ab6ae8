"""Loss aggregation: the global token-mean is independent of the micro-batch split and of data parallelism
(2 gloo ranks, gradients averaged like megatron's DDP); the other modes match their definitions."""

import pytest
import torch
import torch.distributed as dist

from megatron_papo.algorithms import (Aggregation, CollapseDetector, PolicyLossInputs, algorithm_preset,
                                      count_global_tokens, get_policy_loss, reduce_metrics)

F64 = torch.float64
B, T = 8, 6


def _batch():
    """Random rollouts with ragged response lengths (including a one-token one)."""
    g = torch.Generator().manual_seed(3)
    base = -torch.rand(B, T, generator=g, dtype=F64) * 2
    old = base + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref = base + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    msk = base + 1.0 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, 1, generator=g, dtype=F64).expand(B, T).clone()
    lengths = torch.tensor([6, 1, 4, 5, 2, 6, 3, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return base, old, ref, msk, adv, mask


def _reference_loss(theta, mode, *, micro_batches=None):
    """The intended objective over the whole batch, computed directly in float64."""
    base, old, ref, msk, adv, mask = _batch()
    cfg = algorithm_preset("papo_g", eta1=0.05)
    logp = base + theta
    per_token = _per_token(cfg, logp, old, ref, msk, adv)
    m = mask.to(F64)
    if mode == "token-mean":
        return (per_token * m).sum() / m.sum()
    if mode == "seq-mean-token-mean":
        return ((per_token * m).sum(1) / m.sum(1)).mean()
    return torch.stack([(per_token[i] * m[i]).sum() / m[i].sum() for i in micro_batches]).mean()


def _per_token(cfg, logp, old, ref, msk, adv):
    r = torch.exp((logp - old).clamp(-20, 20))
    pg = torch.maximum(-adv * r, -adv * r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip_c), pg)

    def k3(a, b):
        d = (b - a).clamp(-20, 20)
        return (d.exp() - d - 1).clamp(-10, 10)
    return pg + cfg.beta * k3(logp, ref) - cfg.gamma * k3(logp, msk) - cfg.eta1 * logp


def _run_split(theta, rows_per_micro, mode, dp_size=1, global_counts=None, framework_averages=True):
    """Megatron-style accumulation on one rank: backward of loss / num_micro_batches per micro-batch."""
    base, old, ref, msk, adv, mask = _batch()
    cfg = algorithm_preset("papo_g", eta1=0.05)
    tokens, seqs = global_counts or count_global_tokens([mask[r] for r in rows_per_micro])
    agg = Aggregation(mode=mode, global_tokens=tokens, global_sequences=seqs, num_micro_batches=len(rows_per_micro),
                      dp_size=dp_size, framework_averages=framework_averages)
    total, metrics = 0.0, []
    for rows in rows_per_micro:
        logp = base[rows] + theta[rows]
        loss, m = get_policy_loss("papo")(PolicyLossInputs(logp, old[rows], adv[rows], mask[rows],
                                                            ref_logp=ref[rows], mask_logp=msk[rows]), cfg, agg)
        scaled = loss / agg.num_micro_batches if framework_averages else loss
        scaled.backward()
        total += scaled.item()
        metrics.append(m)
    return total, metrics


SPLITS = [
    [list(range(8))],
    [[0, 1], [2, 3], [4, 5], [6, 7]],
    [[0], [1, 2, 3, 4, 5], [6, 7]],
]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_global_means_do_not_depend_on_the_split(mode):
    theta_ref = torch.zeros(B, T, dtype=F64, requires_grad=True)
    want = _reference_loss(theta_ref, mode)
    want.backward()
    for split in SPLITS:
        theta = torch.zeros(B, T, dtype=F64, requires_grad=True)
        # megatron divides each micro-batch loss by M and DDP averages over ranks: grad_scale = M * dp undoes it
        got, _ = _run_split(theta, split, mode)
        assert got == pytest.approx(want.item(), abs=1e-12)
        assert torch.allclose(theta.grad, theta_ref.grad, atol=1e-13), split
        theta_sum = torch.zeros(B, T, dtype=F64, requires_grad=True)
        got_sum, _ = _run_split(theta_sum, split, mode, framework_averages=False)
        assert got_sum == pytest.approx(want.item(), abs=1e-12)
        assert torch.allclose(theta_sum.grad, theta_ref.grad, atol=1e-13)


def test_microbatch_token_mean_is_the_reference_mean_of_means():
    split = SPLITS[2]
    theta_ref = torch.zeros(B, T, dtype=F64, requires_grad=True)
    want = _reference_loss(theta_ref, "microbatch-token-mean", micro_batches=split)
    want.backward()
    theta = torch.zeros(B, T, dtype=F64, requires_grad=True)
    got, _ = _run_split(theta, split, "microbatch-token-mean")
    # what megatron back-propagates: sum of loss / M = mean of the per-micro-batch token means
    assert got == pytest.approx(want.item(), abs=1e-12)
    assert torch.allclose(theta.grad, theta_ref.grad, atol=1e-13)
    # and it differs from the true token-mean on ragged batches (why it is not the default)
    assert abs(want.item() - _reference_loss(torch.zeros(B, T, dtype=F64), "token-mean").item()) > 1e-4


def test_metrics_reduce_exactly_over_splits():
    ms = [_run_split(torch.zeros(B, T, dtype=F64, requires_grad=True), s, "token-mean")[1] for s in SPLITS]
    reduced = [reduce_metrics(m) for m in ms]
    for r in reduced[1:]:
        assert r.keys() == reduced[0].keys()
        for k in r:
            assert r[k] == pytest.approx(reduced[0][k], abs=1e-12), k
    assert reduced[0]["num_tokens"] == 31 and reduced[0]["num_seqs"] == 8
    r = reduced[0]
    assert r["pg_clipfrac"] == pytest.approx(r["pg_clipfrac_low"] + r["pg_clipfrac_high"])
    # the reduced metrics feed the collapse detector as they are (this random masked policy is far from the
    # real one: perception KL ~0.63, past the alarm level)
    assert set(CollapseDetector.WATCHED) <= set(r) and r["perception_kl"] > 0.5
    assert "perception KL" in CollapseDetector().update(r)
    assert reduced[0]["loss"] == pytest.approx(_reference_loss(torch.zeros(B, T, dtype=F64), "token-mean").item())


def test_aggregation_rejects_missing_counts():
    with pytest.raises(ValueError, match="global_tokens"):
        Aggregation(mode="token-mean")
    with pytest.raises(ValueError, match="global_sequences"):
        Aggregation(mode="seq-mean-token-mean", global_tokens=3)
    with pytest.raises(ValueError, match="loss_agg"):
        Aggregation(mode="sum", global_tokens=3)


def _dp_rank(rank, world_size):
    torch.set_default_dtype(torch.float32)
    # rank 0 gets 3 sequences in 2 micro-batches, rank 1 gets 5 in 2: unequal token counts per rank
    rows = [[[0, 1], [2]], [[3, 4, 5], [6, 7]]][rank]
    _, _, _, _, _, mask = _batch()
    counts = count_global_tokens([mask[r] for r in rows], group=dist.group.WORLD)
    theta = torch.zeros(B, T, dtype=F64, requires_grad=True)
    _, metrics = _run_split(theta, rows, "token-mean", dp_size=world_size, global_counts=counts)
    grad = theta.grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    grad /= world_size                                       # megatron DDP: mean over data-parallel ranks
    return grad, reduce_metrics(metrics, group=dist.group.WORLD), counts


def test_global_token_mean_across_two_dp_ranks(multirank):
    theta_ref = torch.zeros(B, T, dtype=F64, requires_grad=True)
    want = _reference_loss(theta_ref, "token-mean")
    want.backward()
    results = multirank(_dp_rank, world_size=2)
    for grad, metrics, counts in results:
        assert counts == (31.0, 8.0)
        # every rank's gradient after the DDP mean is the gradient of the global token-mean
        assert torch.allclose(grad, theta_ref.grad, atol=1e-13)
        assert metrics["loss"] == pytest.approx(want.item(), abs=1e-12)
