"""The prefill with its last layer on each prompt's last position only (``rollout.prefill``) against the plain
prefill (every layer on every position), on the same tiny float64 models (TP = 2: in tests/test_rollout.py,
which calls ``compare_prefills`` inside its TP = 2 run, float32).

Left-padded prompts with an image (Qwen2.5-VL and Qwen3-VL), prefilled in chunks of two prompts: every layer's
cached keys / values and the last position's logits equal the plain prefill's; the last layer's MLP really ran
on one position per prompt (so the comparison exercised the trimmed path); a trimmed layer whose last query
ignores the padding mask must be caught by the same comparison. ``generate`` gives the same tokens and
log-probs with and without the trim.
"""

from __future__ import annotations

import pytest
import torch

from test_lean_decode import _model, _prompts

FAMILIES = ("qwen2.5-vl", "qwen3-vl")


def _prefill(engine, prompts, trim: bool):
    """(logits [P, Vs], {layer: (K, V)} of the prompt positions, MLP input lengths of the last layer)."""
    from megatron_papo.rollout.kv_cache import SharedPrefixContext
    from megatron_papo.rollout.pipeline import eval_mode

    engine.prefill_last_position = trim
    batch = engine._layout(prompts, 1, 4)
    L, seen = batch.ids.shape[1], []
    mlp = engine.stages.model.language_model.decoder.layers[-1].mlp
    hook = mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        with eval_mode(engine.model, torch.inference_mode):
            ctx = SharedPrefixContext(max_batch_size=len(prompts), max_sequence_length=L)
            logits = engine._prefill(prompts, batch, ctx)
    finally:
        hook.remove()
    cache = {k: (kv[0][:L].clone(), kv[1][:L].clone()) for k, kv in ctx.key_value_memory_dict.items()}
    return logits.clone(), cache, seen


def _worst(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _unmasked_last_query(layer_cls):
    """A trimmed layer that drops the padding mask of the last query (a bug the comparison must catch)."""
    call = layer_cls.__call__

    def broken(self, hidden_states, attention_mask=None, **kwargs):
        return call(self, hidden_states, attention_mask=None, **kwargs)

    return broken


def compare_prefills(engine, prompts) -> dict:
    """The trimmed against the plain prefill of ``prompts`` on ``engine`` (also used by tests/test_rollout.py at
    TP = 2): largest relative differences of the logits and of the cache, the last layer's MLP input lengths."""
    r = dict(supported=engine.prefill_last_position)
    plain, trimmed = _prefill(engine, prompts, False), _prefill(engine, prompts, True)
    r["logits"] = _worst(trimmed[0], plain[0])
    r["cache"] = max(_worst(trimmed[1][k][i], plain[1][k][i]) for k in plain[1] for i in (0, 1))
    r["mlp_rows"], r["plain_mlp_rows"] = trimmed[2], plain[2]
    engine.prefill_last_position = r["supported"]
    return r


def _body(rank, world_size):
    from megatron_papo.rollout import MegatronEngine, SamplingParams
    from megatron_papo.rollout.prefill import LastPositionLayer

    out = {}
    for family in FAMILIES:
        model, prompts = _model(family, torch.float64), _prompts(family, torch.float64)
        engine = MegatronEngine(model, max_seq_len=40, eos_ids=[3], prefill_batch_size=2)
        r = out[family] = compare_prefills(engine, prompts)
        plain = _prefill(engine, prompts, False)
        original, LastPositionLayer.__call__ = LastPositionLayer.__call__, _unmasked_last_query(LastPositionLayer)
        try:
            r["broken"] = _worst(_prefill(engine, prompts, True)[0], plain[0])
        finally:
            LastPositionLayer.__call__ = original
        params = SamplingParams(greedy=True, max_new_tokens=6)
        gens = []
        for trim in (False, True):
            engine.prefill_last_position = trim
            g = engine.generate(prompts, 2, params, seed=3)
            gens.append((g.response_ids.tolist(), g.lengths.tolist(), g.logprobs))
        r["same_tokens"] = gens[0][:2] == gens[1][:2]
        r["logprobs"] = float((gens[0][2] - gens[1][2]).abs().max())
    return out


@pytest.fixture(scope="module")
def results():
    from multirank import run_multirank

    return run_multirank(_body, world_size=1, tp=1, pp=1, timeout=300)


@pytest.mark.parametrize("family", FAMILIES)
def test_trimmed_prefill_equals_plain_prefill(results, family):
    r = results[0][family]
    assert r["supported"], "the local spec's last plain layer must get the trimmed prefill"
    assert r["mlp_rows"] == [1, 1] and r["plain_mlp_rows"][0] > 1, r  # two chunks, last position only
    assert r["logits"] <= 1e-12 and r["cache"] <= 1e-12, r  # float64: rounding only


@pytest.mark.parametrize("family", FAMILIES)
def test_comparison_catches_an_unmasked_last_query(results, family):
    assert results[0][family]["broken"] > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_unchanged_by_the_trim(results, family):
    r = results[0][family]
    assert r["same_tokens"] and r["logprobs"] <= 1e-12, r
