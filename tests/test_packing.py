"""Sequence packing (training/packing.py) against padded rows, in float64 on the tiny VLM at TP1, TP2 and PP2:
the scoring log-probs of the real rows and of real + masked rows, and the update's loss and gradients with the
real view alone and with each micro-batch paired with its masked copy (both views), for prompts with images of
different sizes, a text-only prompt, an image token sampled inside a response and rows of different lengths.
Under PP every packed micro-batch has the budget's length (padding tail); at PP = 1 its rows' own. Qwen3-VL runs
the same checks at PP2, its DeepStack layers split across the stages."""

from __future__ import annotations

import pytest
import torch

from multirank import run_multirank

IMG, VSTART, VEND, PAD = 250, 251, 252, 0
T, BUDGET = 6, 48


def _rows(patch_dim: int = 1176):
    """9 rows of 3 prompts (two with images, one text-only) and the same rows with other (masked) images;
    ``patch_dim``: the family's flattened patch (Qwen2.5-VL 1176, Qwen3-VL 1536)."""
    from megatron_papo.training.sequences import Rows

    g = torch.Generator().manual_seed(7)
    txt = lambda k: torch.randint(3, 200, (k,), generator=g).tolist()  # noqa: E731
    prompts, images, masked = [], [], []
    for text_len, grid in ((5, [1, 4, 4]), (11, None), (2, [1, 8, 4])):
        if grid is None:
            prompts.append(torch.tensor(txt(text_len)))
            images.append((None, None))
            masked.append((None, None))
            continue
        grid = torch.tensor([grid])
        prompts.append(torch.tensor(txt(2) + [VSTART] + [IMG] * (int(grid.prod()) // 4) + [VEND] + txt(text_len)))
        images.append((torch.randn(int(grid.prod()), patch_dim, generator=g), grid))
        masked.append((torch.randn(int(grid.prod()), patch_dim, generator=g), grid))
    n = 3
    resp = torch.randint(3, 200, (3 * n, T), generator=g)
    resp[4, 2] = IMG                                         # a sampled image token: fed as pad, scored as itself
    lengths = torch.tensor([6, 3, 1, 6, 5, 0, 4, 6, 2])
    mask = torch.arange(T)[None] < lengths[:, None]
    resp = resp.masked_fill(~mask, PAD)
    real = Rows([prompts[i // n] for i in range(3 * n)], resp, mask, [images[i // n] for i in range(3 * n)])
    return real, real.with_images([masked[i // n] for i in range(3 * n)])


def _update(model, real, masked, budget: int, adv: torch.Tensor):
    """Global token-mean loss (and its gradients) of a small policy-gradient + entropy (+ perception) objective."""
    from megatron_papo.algorithms.aggregation import Aggregation, aggregate
    from megatron_papo.training.packing import micro_batches
    from megatron_papo.training.sequences import pair, paired_response_stats, response_stats, run_schedule

    mbs = micro_batches(real, 4, PAD, max_tokens=budget, tokens={"adv": adv}, image_token_id=IMG)
    if masked is not None:
        mbs = [pair(a, b) for a, b in zip(mbs, micro_batches(masked, 4, PAD, max_tokens=budget,
                                                             image_token_id=IMG))]
    agg = Aggregation("token-mean", float(real.response_mask.sum()), 1.0, len(mbs), 1)

    def loss_fn(logits, mb):
        if masked is None:
            logp, ent = response_stats(logits, mb, 0.7)
            per_token = -logp * mb.tokens["adv"] - 0.1 * ent
        else:
            logp, ent, mask_logp, kl = paired_response_stats(logits, mb, 0.7, masked_grad=True)
            per_token = -logp * mb.tokens["adv"] - 0.1 * ent + 0.5 * kl + 0.3 * (logp - mask_logp) ** 2
        loss = aggregate(per_token, mb.resp_mask, agg)
        return loss, {"loss": loss.detach() / agg.grad_scale}

    model.zero_grad(set_to_none=True)
    out = run_schedule(model, mbs, loss_fn, forward_only=False)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return (sum(float(o["loss"]) for o in out) if out else None), grads, [tuple(m.input_ids.shape) for m in mbs]


def _body(rank, world_size, preset: str = "tiny"):
    from megatron_papo.models import build_vlm
    from megatron_papo.training.scoring import schedule_logprobs

    torch.manual_seed(0)
    model = build_vlm(preset, vocab_size=256, image_token_id=IMG, vision_start_token_id=VSTART,
                      params_dtype=torch.float64).double()              # megatron's torch norms stay fp32 else
    with torch.no_grad():                                    # sharper attention / logits than the 0.02 init
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    real, masked = _rows(model.spec.vision.patch_dim)
    out = {}
    for name, rows in (("real", real), ("both", real.concat(masked))):
        plain = schedule_logprobs(model, rows, 4, PAD, IMG, 0.7)
        packed = schedule_logprobs(model, rows, 4, PAD, IMG, 0.7, max_tokens=2 * BUDGET)
        out[f"logp/{name}"] = None if plain is None else (
            ((packed - plain) * rows.response_mask).abs().max().item(), plain[rows.response_mask].abs().mean().item())
    adv = torch.randn(real.response_mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for view, m in (("real", None), ("paired", masked)):
        loss_pad, g_pad, _ = _update(model, real, m, 0, adv)
        loss_pack, g_pack, shapes = _update(model, real, m, BUDGET, adv)
        out[f"update/{view}"] = {
            "loss": (loss_pad, loss_pack), "shapes": shapes, "grad_keys": sorted(g_pad) == sorted(g_pack),
            "grad_diff": max((g_pad[k] - g_pack[k]).abs().max().item() for k in g_pad),
            "grad_scale": max(g.abs().max().item() for g in g_pad.values())}
    return out


def _check(res, pp: int):
    for rank, r in enumerate(res):
        last = rank == len(res) - 1 or pp == 1
        for key, v in r.items():
            if key.startswith("logp/"):
                if not last:
                    continue
                diff, scale = v
                assert scale > 0.5 and diff < 1e-10, f"rank {rank} {key}: packed differs from padded by {diff}"
                continue
            assert v["grad_keys"] and v["grad_scale"] > 1e-3, f"rank {rank} {key}: no gradients"
            assert v["grad_diff"] < 1e-10 * max(1.0, v["grad_scale"]), f"rank {rank} {key}: grad {v['grad_diff']}"
            if last:
                pad, packed = v["loss"]
                assert abs(pad - packed) < 1e-10 and abs(pad) > 1e-3, f"rank {rank} {key}: loss {pad} vs {packed}"
            k = 2 if key.endswith("paired") else 1
            assert all(s[0] == k for s in v["shapes"]), v["shapes"]          # one packed sequence (+ masked)
            if pp > 1:                                                       # one shape: the budget
                assert {s[1] for s in v["shapes"]} == {BUDGET}, v["shapes"]
            else:
                assert max(s[1] for s in v["shapes"]) <= BUDGET and len(v["shapes"]) < 9 // 4 + 1 + 2


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_packed_equals_padded(tp, pp):
    _check(run_multirank(_body, tp * pp, tp=tp, pp=pp, timeout=240), pp)


def test_qwen3_packed_equals_padded_across_a_deepstack_split():
    """Qwen3-VL shares the composition's packed path: PP2 splits its DeepStack layers, so the features ride along."""
    _check(run_multirank(_body, 2, tp=1, pp=2, timeout=240, args=("qwen3-vl-tiny",)), 2)


def test_first_fit_decreasing_and_row_order():
    from megatron_papo.training.packing import first_fit_decreasing, micro_batches, row_lengths, unpack_rows

    lengths = [7, 3, 5, 2, 8, 1, 4]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins) and len(bins) == 3     # 30 tokens: 3 bins of 10
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        first_fit_decreasing([11], 10)
    real, _ = _rows()
    mbs = micro_batches(real, 4, PAD, max_tokens=BUDGET, image_token_id=IMG, one_shape=False)
    assert sum(mb.input_ids.shape[1] for mb in mbs) == int(row_lengths(real).sum())  # no padding at all
    back = unpack_rows([mb.row_index.double()[:, None] for mb in mbs], mbs, len(real))
    assert back[:, 0].tolist() == list(range(len(real)))


def test_update_micro_batch_rows_are_the_micro_batches_the_update_runs():
    """What ``vppo_stats=reference`` calls a micro-batch: per mini-batch (6 rows here), the rows of each
    micro-batch the update builds from it: token-budget bins under packing, runs of micro_batch_size without."""
    from megatron_papo.training.packing import micro_batches, update_micro_batch_rows

    real, _ = _rows()
    assert update_micro_batch_rows(real, 6, 4, 0) == [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    want = []
    for a in (0, 6):
        sub = real.select(list(range(a, min(a + 6, len(real)))))
        want += [[a + i for i in mb.row_index.tolist()]
                 for mb in micro_batches(sub, 4, PAD, max_tokens=30, image_token_id=IMG, one_shape=False)]
    got = update_micro_batch_rows(real, 6, 4, 30)
    assert got == want and got != [[0, 1, 2, 3], [4, 5], [6, 7, 8]]      # bins by length, not row counts


def test_budget_must_hold_the_longest_row():
    from megatron_papo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        load_config(None, ["data.max_prompt_length=100", "rollout.max_new_tokens=50",
                           "training.max_tokens_per_micro_batch=120"])
    cfg = load_config(None, ["data.max_prompt_length=100", "rollout.max_new_tokens=50",
                             "training.max_tokens_per_micro_batch=150"])
    assert cfg.training.max_tokens_per_micro_batch == 150
