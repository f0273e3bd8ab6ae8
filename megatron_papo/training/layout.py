"""``--dry-run``: validate the parallel layout for a world size, count parameters per rank analytically, plan the
memory per GPU (``training.memory_plan``) and warn about paths a run would read that do not exist yet.

Counting from the architecture (no allocation) makes the 72B preset's layout checkable on a laptop. Megatron's
split: attention heads, MLP columns and the (padded) vocabulary divide by TP; norms and the vision tower's
small pieces are replicated; layers divide over PP; vision tower + embedding sit on the first stage, the final
norm + output layer on the last.
"""

from __future__ import annotations

import os

from megatron_papo.config import Config
from megatron_papo.models import family_of_spec, get_preset, padded_vocab_size
from megatron_papo.platform import check_layout
from megatron_papo.training.memory_plan import describe_memory


def params_per_stage(cfg: Config, spec=None) -> list[int]:
    """Parameters held by one rank of each pipeline stage (TP-sharded), first stage first (``spec``: the
    architecture; default the preset's)."""
    spec = spec or get_preset(cfg.model.preset)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if spec.num_layers % pp:
        raise ValueError(f"parallel.pipeline_model_parallel_size {pp} must divide the {spec.num_layers} layers of "
                         f"{cfg.model.preset}")
    ok = [t for t in range(1, spec.num_heads + 1) if spec.num_heads % t == 0 and spec.num_kv_heads % t == 0]
    if spec.num_heads % tp:
        raise ValueError(f"parallel.tensor_model_parallel_size {tp} must divide the {spec.num_heads} attention "
                         f"heads of {cfg.model.preset}; valid sizes: {ok}")
    if spec.num_kv_heads % tp:
        raise ValueError(f"parallel.tensor_model_parallel_size {tp} must divide the {spec.num_kv_heads} key/value "
                         f"heads (grouped-query attention) of {cfg.model.preset}; valid sizes: {ok}")
    vocab = padded_vocab_size(spec.vocab_size) * spec.hidden_size / tp
    layer, vision = family_of_spec(spec).param_counts(spec, tp)
    stages = []
    for s in range(pp):
        n = spec.num_layers // pp * layer
        if s == 0:
            n += vocab + vision
        if s == pp - 1:
            n += spec.hidden_size + (vocab if (not spec.tie_word_embeddings or pp > 1) else 0)
        stages.append(int(n))
    return stages


def describe_layout(cfg: Config) -> str:
    p = cfg.parallel
    world = p.world_size or int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    dp = check_layout(world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    if cfg.training.prompts_per_update % dp:
        raise ValueError(f"training.prompts_per_update ({cfg.training.prompts_per_update}) must be a multiple of the "
                         f"data-parallel size {dp} (world {world} / TP {p.tensor_model_parallel_size} / PP "
                         f"{p.pipeline_model_parallel_size})")
    stages = params_per_stage(cfg)
    lines = [f"config OK: model {cfg.model.preset}, algorithm {cfg.algorithm.preset}",
             f"layout: world {world} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} "
             f"x DP {dp}"]
    for s, n in enumerate(stages):
        lines.append(f"  pipeline stage {s}: {n / 1e6:,.2f}M parameters per rank")
    total = sum(stages) * p.tensor_model_parallel_size
    lines.append(f"parameters per rank: max {max(stages) / 1e6:,.2f}M (model total ~{total / 1e9:,.3f}B)")
    lines += describe_memory(cfg, dp)
    lines += [f"warning: {w}" for w in missing_paths(cfg)]
    return "\n".join(lines)


def missing_paths(cfg: Config) -> list[str]:
    """What a run would read and is not there yet (a layout can be planned before the data is staged)."""
    out = []
    if cfg.model.load and not os.path.exists(cfg.model.load):
        out.append(f"model.load {cfg.model.load!r} does not exist (convert it first: tools/convert_checkpoint.py "
                   "hf-to-mcore)")
    tok = cfg.data.tokenizer
    if tok.path and not os.path.exists(tok.path):
        out.append(f"data.tokenizer.path {tok.path!r} does not exist")
    if not cfg.data.synthetic_if_missing:
        from megatron_papo.data.reader import resolve_shards

        try:
            resolve_shards(cfg.data.train_shards)
        except ValueError as e:
            out.append(str(e))
    return out
