"""Section 6 of the GPU check: graph decode. The engine's fixed-shape decode (row cap, refills) against its normal
decode (tokens), then captured as CUDA graphs per batch bucket against the same steps run eagerly (tokens
identical), tokens/s of the three; on CPU the graph rows are SKIP.

Legend: z the section's size dict (as section 2's).
"""

from __future__ import annotations

import tempfile

from .common import FAIL, OK, SKIP, engine_from_hf, hf_tiny, row


def _graph_runs(z: dict):
    """(seconds, response ids, stats, tokens) of the normal decode, fixed-shape eager and fixed-shape with graphs
    (each timed on its second run: one-time costs and graph captures out of it)."""
    import torch

    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.platform import Timer
    from megatron_papo.rollout import MegatronEngine, SamplingParams

    with tempfile.TemporaryDirectory() as hf_dir:
        hf_tiny(hf_dir, z["hidden"], z["layers"], z["vocab"])
        model = engine_from_hf(hf_dir).model
    num, n = 2 * z["prompts"], 8
    ids = torch.randint(0, z["vocab"] - 8, (num, z["prompt_len"]), generator=torch.Generator().manual_seed(1))
    prompts = [PromptInputs(r.clone(), None, None) for r in ids]
    cap = num * n // 2  # half the rows at once (two groups or more): refills into freed group slots
    budgets = torch.randint(1, z["new_tokens"] + 1, (num * n,), generator=torch.Generator().manual_seed(2))
    out = {}
    for name, kw in (("normal", {}), ("eager", dict(fixed_shape=True, cuda_graphs=False)),
                     ("graph", dict(fixed_shape=True))):
        engine = MegatronEngine(model, max_seq_len=4096, eos_ids=[], pad_id=0, max_rows=cap, **kw)
        engine._layout = _with_budgets(engine._layout, budgets)  # rows end at different lengths: mixed steps
        params = SamplingParams(greedy=True, max_new_tokens=z["new_tokens"])
        with torch.no_grad():
            engine.generate(prompts, n, params, seed=0)
            with Timer() as t:
                res = engine.generate(prompts, n, params, seed=0)
        out[name] = (t.seconds, res.response_ids, dict(engine.last_stats), int(res.lengths.sum()))
    return out


def _with_budgets(layout, budgets):
    """The engine's layout with row r's token budget cut to budgets[r] (as if it sampled EOS there)."""
    import torch

    def budgeted(prompts, n, max_new):
        batch = layout(prompts, n, max_new)
        batch.limits = torch.minimum(batch.limits, budgets)
        return batch

    return budgeted


def section_graph(args) -> None:
    from megatron_papo.platform import device, init_model_parallel
    from megatron_papo.platform.decode_accel import can_capture

    init_model_parallel(1, 1)
    z = args.sizes["rollout"]
    out = _graph_runs(z)
    tokens = out["normal"][3]
    same = (out["eager"][1] == out["normal"][1]).all(-1).float().mean().item()
    row("6 graph", "fixed-shape decode rows = normal decode rows", f"{same:.1%}", ">= 90% (100% on CPU)",
        OK if same >= (0.9 if can_capture(device()) else 1.0) else FAIL)
    for name in ("normal", "eager", "graph"):
        s = out[name][0]
        row("6 graph", f"tokens/s, {name} ({2 * z['prompts']}x8 rows, cap {8 * z['prompts']})", f"{tokens / s:.0f}",
            f"{out['eager'][0] / s:.2f}x fixed-shape eager" if name == "graph" else "")
    mixed = out["normal"][2].get("mixed_steps", 0)
    row("6 graph", "forwards with rows at different steps", mixed, "> 0 (budgets differ)", OK if mixed else FAIL)
    if not can_capture(device()):
        row("6 graph", "graph replay tokens = eager tokens", "no CUDA graphs on this device", "", SKIP)
        return
    st = out["graph"][2]
    row("6 graph", "decode steps replayed from graphs", f"{st.get('graph_steps', 0)} of {st.get('steps', 0)}",
        "all (capture failed: eager fallback)" if not st.get("graph_steps") else "all",
        OK if st.get("graph_steps") == st.get("steps") else FAIL)
    equal = bool((out["graph"][1] == out["eager"][1]).all())
    row("6 graph", "graph replay tokens = eager tokens", "identical" if equal else "differ", "identical",
        OK if equal else FAIL)
