"""n = 1 decoding reads each row's prompt keys and own keys in ONE attention call (``SharedPrefixKV.joint_key``).

With one row per prompt, ``RunningContext(joint=True)`` keeps a layer's prompt part and own part as two views of
one ``[rows, ng, L + T, hn]`` buffer, and a decode step attends to ``[:, :, :L + t]`` in one call instead of
two calls merged through their log-sum-exps. Checked: the joint read against a float64 softmax over the row's
real keys (left padding, rows at different steps, fused kernel and plain formula), with the split fields
poisoned so that only the joint read can pass; the context's joint views stay the concatenation of its prompt
and own views through admission, decode writes and compaction; and the engine at n = 1 gives the same greedy and
sampled tokens with the joint read and with the split read (with and without a row cap).

Legend: P prompts = b rows (n = 1), L prompt length, t own keys, ng groups, rep heads per group, hn head dim.
"""

from __future__ import annotations

import types

import pytest
import torch
from vlm_helpers import sdp_attention

NG, REP, HN = 2, 3, 8


def _attention():
    return sdp_attention(NG, REP, HN, "no_mask")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("padded,per_row", [(True, False), (False, False), (True, True), (False, True)])
def test_joint_read_equals_float64_reference(monkeypatch, fused, padded, per_row):
    from megatron_papo.models.common import attention
    from megatron_papo.models.common.attention import SharedPrefixKV

    if not fused:
        monkeypatch.setattr(attention, "_CPU_FLASH", None)
    elif attention._CPU_FLASH is None:
        pytest.skip("this torch build has no fused CPU attention kernel")
    g = torch.Generator().manual_seed(0)
    b, L, t = 4, 6, 5
    pk, pv, ok, ov = (torch.randn(b, NG, s, HN, generator=g) for s in (L, L, t, t))
    keep = torch.ones(b, L, dtype=torch.bool)
    if padded:
        keep[0, :3], keep[2, :1] = False, False
    own_len = torch.tensor([1, 5, 3, 2]) if per_row else None
    n_own = own_len if per_row else torch.full((b,), t)
    late = (torch.arange(t)[None, :] >= n_own[:, None])[:, None, :, None]  # [b, 1, t, 1]
    ok, ov = ok.masked_fill(late, 1e3), ov.masked_fill(late, 1e3)  # would dominate if read
    pk, pv = pk.masked_fill(~keep[:, None, :, None], 1e3), pv.masked_fill(~keep[:, None, :, None], 1e3)
    q = torch.randn(1, b, NG * REP, HN, generator=g)
    nan = torch.full_like(ok, float("nan"))  # the split read must not be used
    kv = SharedPrefixKV(pk, pv, keep, [1] * b, nan, nan, padded, own_len,
                        torch.cat([pk, ok], 2), torch.cat([pv, ov], 2))
    with torch.no_grad():
        got = _attention()(q, kv, kv, None)[0].reshape(b, NG * REP, HN)
    for i in range(b):
        k = torch.cat([pk[i][:, keep[i]], ok[i, :, :int(n_own[i])]], 1).double().repeat_interleave(REP, 0)
        v = torch.cat([pv[i][:, keep[i]], ov[i, :, :int(n_own[i])]], 1).double().repeat_interleave(REP, 0)
        w = torch.softmax(q[0, i].double()[:, None] @ k.transpose(-1, -2) / HN ** 0.5, -1)  # [np, 1, s]
        torch.testing.assert_close(got[i].double(), (w @ v)[:, 0], atol=2e-6, rtol=2e-6)


def test_running_context_joint_views_are_prompt_then_own():
    from megatron_papo.rollout.kv_cache import RunningContext

    g = torch.Generator().manual_seed(2)
    L, T, rows = 4, 6, 5
    ctx = RunningContext(rows, rows, L, T, joint=True)
    for k in (3, 2):  # two admissions
        pre = types.SimpleNamespace(key_value_memory_dict={
            1: (torch.randn(L, k, NG, HN, generator=g), torch.randn(L, k, NG, HN, generator=g))})
        ctx.admit(pre, torch.ones(k, L, dtype=torch.bool), 1)
    ctx.sequence_len_offset = L + 2  # every row writes response index 2
    kv = ctx.decode_kv(1, torch.randn(1, rows, NG, HN, generator=g), torch.randn(1, rows, NG, HN, generator=g))
    assert kv.joint_key.shape == (rows, NG, L + 3, HN)
    torch.testing.assert_close(kv.joint_key, torch.cat([kv.prefix_key, kv.own_key], 2), rtol=0, atol=0)
    torch.testing.assert_close(kv.joint_value, torch.cat([kv.prefix_value, kv.own_value], 2), rtol=0, atol=0)
    before = kv.joint_key[[0, 3, 4]].clone()
    ctx.keep_rows(torch.tensor([0, 3, 4]), width=3)  # rows 1, 2 finished: their prompts drop too
    ctx.set_row_steps(torch.tensor([2, 0, 1]), 3)
    kv = ctx.decode_kv(1, torch.zeros(1, 3, NG, HN), torch.zeros(1, 3, NG, HN))
    assert kv.own_len.tolist() == [3, 1, 2]
    torch.testing.assert_close(kv.joint_key, torch.cat([kv.prefix_key, kv.own_key], 2), rtol=0, atol=0)
    written = torch.zeros(3, L + 3, dtype=torch.bool)
    written[[0, 1, 2], [L + 2, L, L + 1]] = True  # the new keys (zeros), everything else moved unchanged
    assert torch.equal(kv.joint_key.permute(0, 2, 1, 3)[~written], before.permute(0, 2, 1, 3)[~written])
    with pytest.raises(ValueError, match="joint"):
        RunningContext(4, 2, L, T, joint=True)


def _engine_body(rank, world_size):
    """n = 1 outputs with the joint read and the split read: {(max_rows, lean, joint): (sampled, greedy, stats)}."""
    from test_lean_decode import EOS, _model, _prompts

    from megatron_papo.rollout import MegatronEngine, SamplingParams, kv_cache, scheduler

    model, prompts = _model("qwen2.5-vl", torch.float32), _prompts("qwen2.5-vl", torch.float32)
    params = (SamplingParams(temperature=1.2, top_p=0.9, max_new_tokens=10),
              SamplingParams(greedy=True, max_new_tokens=10))
    made, real, out = [], kv_cache.RunningContext, {}
    for max_rows, lean in ((0, True), (2, True), (0, False)):
        for joint in (True, False):
            scheduler.RunningContext = lambda *a, joint=False, _use=joint, **k: made.append(  # noqa: E731
                real(*a, joint=joint and _use, **k)) or made[-1]
            engine = MegatronEngine(model, max_seq_len=40, eos_ids=EOS, max_rows=max_rows, lean_decode=lean)
            res = [engine.generate(prompts, 1, p, seed=11) for p in params]
            out[max_rows, lean, joint] = [dict(ids=o.response_ids.tolist(), lengths=o.lengths.tolist(),
                                               lp=o.logprobs) for o in res] + [
                dict(engine.last_stats, joint=[c.joint for c in made[-2:]], lean=engine.lean_decode)]
    scheduler.RunningContext = real
    return out


@pytest.fixture(scope="module")
def engine_results():
    from multirank import run_multirank

    return run_multirank(_engine_body, world_size=1, tp=1, pp=1, timeout=300)[0]


@pytest.mark.parametrize("max_rows,lean", [(0, True), (2, True), (0, False)])
def test_engine_n1_joint_read_equals_split_read(engine_results, max_rows, lean):
    joint, split = engine_results[max_rows, lean, True], engine_results[max_rows, lean, False]
    assert joint[2]["joint"] == [True, True] and split[2]["joint"] == [False, False]
    assert joint[2]["lean"] == lean
    assert joint[2]["mixed_steps"] > 0 or max_rows == 0  # the cap refills: rows at different steps
    for a, b in zip(joint[:2], split[:2]):
        assert a["ids"] == b["ids"] and a["lengths"] == b["lengths"]
        torch.testing.assert_close(a["lp"], b["lp"], atol=2e-5, rtol=1e-5)
    assert len(set(joint[0]["lengths"])) > 1  # rows finished at different steps (compaction ran)
