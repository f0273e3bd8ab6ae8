"""The trainer's configuration: a tree of typed dataclasses, YAML presets, ``--set a.b=c`` overrides, validation.

Every field has a one-line docstring (the comment above it). Unknown keys are errors. Validation raises
``ValueError`` naming the field and the fix. ``load_config(path, overrides)`` is the single entry point.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class ParallelConfig:
    # tensor-parallel size (splits attention heads, MLP and vocabulary)
    tensor_model_parallel_size: int = 1
    # pipeline-parallel size (splits layers into stages; the vision tower lives on the first)
    pipeline_model_parallel_size: int = 1
    # number of processes expected for --dry-run (0: the launcher's world size)
    world_size: int = 0
    # megatron sequence parallelism (needs tensor_model_parallel_size > 1)
    sequence_parallel: bool = False
    # memory of one GPU in GB, for the --dry-run memory plan's verdict
    gpu_memory_gb: float = 80.0


@dataclass
class ModelConfig:
    # size preset: tiny | qwen2.5-vl-{3b,7b,32b,72b} | qwen3-vl-{2b,4b,8b,32b} | qwen3-vl-tiny (the family follows)
    preset: str = "tiny"
    # megatron dist checkpoint to initialise the policy from (e.g. the output of convert_checkpoint.py hf-to-mcore)
    load: Optional[str] = None
    # layer implementation: local (torch SDPA, runs on CPU) | transformer_engine (GPU, needed for FP8)
    transformer_impl: str = "local"
    # FP8 format: null (off) | e4m3 | hybrid (needs Transformer Engine and an Ada, Hopper or Blackwell GPU)
    fp8: Optional[str] = None
    # FP8 scaling recipe: delayed | tensorwise (Ada+) | blockwise (Hopper, CUDA >= 12.9) | mxfp8 (Blackwell)
    fp8_recipe: str = "delayed"
    # parameter dtype: float32 | bfloat16
    params_dtype: str = "float32"
    # do not train the vision tower and merger (the published runs train them)
    freeze_vision: bool = False
    # recompute activations in backward to save memory
    recompute: bool = False


@dataclass
class TokenizerConfig:
    # tokenizer kind: sentencepiece | huggingface
    type: str = "sentencepiece"
    # sentencepiece .model file or Hugging Face tokenizer directory (null: train/reuse the demo tokenizer)
    path: Optional[str] = None
    # vocabulary size when training the demo sentencepiece tokenizer (path null); a small corpus may give fewer
    vocab_size: int = 512


@dataclass
class DataConfig:
    # training shards: a directory, a glob or a brace pattern of webdataset .tar files
    train_shards: str = "runs/demo/data/train"
    # make SYNTHETIC shards at train_shards if it holds none, announced loudly (the embedded demo sets it)
    synthetic_if_missing: bool = False
    # number of synthetic samples to make when synthetic_if_missing applies
    synthetic_samples: int = 2000
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # prompts with more tokens than this are skipped (and counted)
    max_prompt_length: int = 4096
    # shuffle buffer size in samples (0: no shuffling)
    shuffle_buffer: int = 1000
    # data loader worker processes per rank
    num_workers: int = 0
    # smallest image area in pixels after resize (multiple of 28*28)
    min_pixels: int = 256 * 28 * 28
    # largest image area in pixels after resize
    max_pixels: int = 1280 * 28 * 28
    # validation shards evaluated during training every training.eval_interval RL steps (null: none)
    val_shards: Optional[str] = None
    # samples with a tar member larger than this many bytes are skipped unread and counted (0: no cap)
    max_member_bytes: int = 512 * 1024 * 1024
    # samples with an image of more pixels than this (read from its header, before decoding) are skipped (0: no cap)
    max_image_pixels: int = 150_000_000
    # samples whose images hold more pixels than this in total are skipped before decoding (0: no cap)
    max_sample_pixels: int = 400_000_000


@dataclass
class RolloutConfig:
    # responses sampled per prompt (the GRPO group size)
    n: int = 5
    # sampling temperature, also used when scoring log-probs (0: greedy decoding, log-probs scored at temperature 1)
    temperature: float = 1.0
    # nucleus sampling threshold (1.0: off)
    top_p: float = 0.99
    # top-k sampling (0: off)
    top_k: int = 0
    # longest response in tokens
    max_new_tokens: int = 2048
    # extra strings that end a response (the tokenizer's EOS always does)
    stop: list = field(default_factory=list)
    # recompute the old log-probs with a training forward instead of taking the rollout engine's (with top_p < 1
    # or top_k > 0 they are always recomputed: the sampling distribution is then not the policy's)
    recompute_old_logprobs: bool = False
    # rows in flight in the rollout engine at most, KV cache included; prompts wait and join as rows finish
    # (continuous batching; same outputs); 0: every row of a step at once; else >= rollout.n
    max_batch_rows: int = 0
    # decode steps computed directly from the layers' weights where the model allows it (local spec, TP = PP = 1;
    # same logits as megatron's forward, faster on CPU); false: every step through megatron's forward
    lean_decode: bool = True


@dataclass
class AlgorithmConfig:
    # preset whose published hyper-parameters fill every field not set explicitly: grpo | dapo | papo_g | papo_d | vppo
    preset: str = "papo_g"
    # advantage estimator (registry name)
    advantage: str = "grpo"
    # policy loss (registry name)
    policy_loss: str = "papo"
    # lower PPO clip range
    eps_low: float = 0.2
    # upper PPO clip range
    eps_high: float = 0.3
    # dual-clip constant C for negative advantages
    dual_clip_c: float = 3.0
    # reference-model k3 KL coefficient (0: no reference model)
    beta: float = 0.01
    # Implicit Perception Loss coefficient gamma (0: plain GRPO/DAPO)
    gamma: float = 0.02
    # Double Entropy Loss coefficient on the policy's sampled-token NLL
    eta1: float = 0.0
    # Double Entropy Loss coefficient on the masked policy's sampled-token NLL
    eta2: float = 0.0
    # recompute the masked-image log-probs with gradient each micro-batch (default: stop-gradient, once per step)
    perception_grad: bool = False
    # use the exact full-vocabulary KL(pi(.|I) || pi(.|I_mask)) instead of the k3 estimate
    exact_perception_kl: bool = False
    # loss aggregation: token-mean (global) | seq-mean-token-mean | microbatch-token-mean (reference)
    loss_agg: str = "token-mean"
    # DAPO dynamic sampling: keep only groups with mean accuracy strictly inside (min, max)
    dynamic_sampling: bool = False
    # lower accuracy bound for dynamic sampling
    dynamic_sampling_min: float = 0.01
    # upper accuracy bound for dynamic sampling
    dynamic_sampling_max: float = 0.99
    # most generation rounds to fill a batch under dynamic sampling
    dynamic_sampling_max_tries: int = 20
    # fraction of mask-grid cells blackened
    mask_ratio: float = 0.6
    # mask cell size in raw-image pixels (null: the model family's patch, 14 px Qwen2.5-VL, 16 px Qwen3-VL)
    mask_patch_size: Optional[int] = None
    # mask fill value (0: black)
    mask_fill: int = 0
    # mask on the model's merged-patch grid (28 px Qwen2.5-VL, 32 px Qwen3-VL) instead of the raw pixel grid
    mask_on_merged_grid: bool = False
    # auxiliary views scored in the one no-grad pass: masked | blank | noise (null: the views the consumers read)
    views: Optional[list] = None
    # consumers of the view log-probs: papo | vppo (null: papo when gamma > 0 or eta2 > 0, else none)
    consumers: Optional[list] = None
    # draw the random views (masked, noise) once per response instead of once per prompt (no prefix sharing then)
    view_per_response: bool = False
    # standard deviation of the Gaussian noise added to the normalised pixels (noise view)
    noise_sigma: float = 1.0
    # VPPO: fraction p of each response's tokens that keep the policy-gradient term (top ceil(p*|o|) by dependency)
    vppo_token_fraction: float = 0.4
    # VPPO: smallest advantage scale s_min (largest: s_min + (1 - s_min) / mean of the normalised dependencies)
    vppo_s_min: float = 0.9
    # VPPO: the view whose log-probs measure visual dependency (must be among the scored views)
    vppo_view: str = "masked"
    # VPPO shaping statistics: global (RL step, all DP ranks) | reference (per rank: mini-batch min/max, micro mean)
    vppo_stats: str = "global"


@dataclass
class OptimizerConfig:
    # peak learning rate
    lr: float = 1e-6
    # AdamW weight decay
    weight_decay: float = 0.01
    # AdamW beta1
    adam_beta1: float = 0.9
    # AdamW beta2
    adam_beta2: float = 0.999
    # AdamW epsilon
    adam_eps: float = 1e-8
    # gradient-norm clip (0: off)
    clip_grad: float = 1.0
    # linear warm-up steps (optimizer steps)
    warmup_steps: int = 0
    # learning rate schedule after warm-up: constant | cosine
    schedule: str = "constant"
    # shard optimizer state across data-parallel ranks (megatron distributed optimizer)
    use_distributed_optimizer: bool = True


@dataclass
class TrainingConfig:
    # number of RL steps
    rl_steps: int = 202
    # prompts per RL step (the rollout batch)
    prompts_per_step: int = 384
    # prompts per optimizer step (PPO mini-batch); prompts_per_step must be a multiple
    prompts_per_update: int = 128
    # sequences per micro-batch in forward/backward (when max_tokens_per_micro_batch is 0)
    micro_batch_size: int = 4
    # sequence packing: rows packed without padding into micro-batches of at most this many tokens (scoring: twice
    # as many); must hold data.max_prompt_length + rollout.max_new_tokens; 0: off, micro_batch_size padded rows
    max_tokens_per_micro_batch: int = 0
    # PPO epochs over each RL step's rollouts
    ppo_epochs: int = 1
    # supervised warm-start steps on the data's answers before RL (the CPU demo uses them; 0: none)
    warmup_sft_steps: int = 0
    # peak learning rate of the supervised warm-start steps (0: optimizer.lr)
    warmup_sft_lr: float = 0.0
    # run seed: model init, data order, masks, sampling
    seed: int = 1234
    # torch CPU threads per process (0: this node's cores divided among its ranks); small models on shared cores
    # run far better with 1, since threads that wait for each other stall whenever another process takes a core
    cpu_threads: int = 0
    # scoring pass runs each distinct prompt once and the rows' responses against it (PP=1, local spec; else plain)
    prefix_scoring: bool = True
    # validate on data.val_shards every N RL steps: avg@k and image reliance to console and tensorboard (0: off)
    eval_interval: int = 0
    # validation questions: the first N good samples of data.val_shards (0: all)
    eval_limit: int = 64
    # answers sampled per validation question (avg@k)
    eval_k: int = 2
    # seconds one response may take to grade; slower ones score 0 and are counted (0: grade inline, no limit)
    reward_timeout_s: float = 10.0
    # reward worker processes per rank (used when reward_timeout_s > 0)
    reward_workers: int = 2
    # stop (error, last checkpoint kept) after this many consecutive RL steps of skipped non-finite updates (0: never)
    max_skipped_steps: int = 5


@dataclass
class CheckpointConfig:
    # checkpoint directory (step_<N> subdirectories)
    dir: str = "runs/demo/checkpoints"
    # save every N RL steps (0: only at the end)
    save_interval: int = 50
    # keep the newest k checkpoints (0: keep all)
    keep_last: int = 3
    # resume: null (fresh start) | auto (newest complete one in dir, if any) | a checkpoint directory
    resume: Optional[str] = "auto"
    # on resume, the config's learning-rate schedule (optimizer.lr, warmup, schedule) replaces the checkpoint's
    override_lr_schedule: bool = True
    # on resume, continue the data order where the checkpoint stopped (false: start reading afresh from the seed)
    load_reader_state: bool = True
    # record each file's CRC32 in complete.json and check it before resuming (one extra read at save and resume)
    checksums: bool = True


@dataclass
class LoggingConfig:
    # tensorboard log directory (null: no tensorboard)
    tensorboard_dir: Optional[str] = "runs/demo/tensorboard"
    # print a console line every N RL steps
    log_interval: int = 1
    # show progress bars for long phases
    progress: bool = True


@dataclass
class Config:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --- published algorithm presets (docs/algorithm.md section 3) -------------------------------------------------
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(advantage="grpo", policy_loss="papo", eps_low=0.2, eps_high=0.3, dual_clip_c=3.0, beta=0.01,
                 gamma=0.0, eta1=0.0, eta2=0.0, dynamic_sampling=False),
    "papo_g": dict(advantage="grpo", policy_loss="papo", eps_low=0.2, eps_high=0.3, dual_clip_c=3.0, beta=0.01,
                   gamma=0.02, eta1=0.0, eta2=0.0, dynamic_sampling=False),
    "dapo": dict(advantage="grpo", policy_loss="papo", eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, beta=0.0,
                 gamma=0.0, eta1=0.0, eta2=0.0, dynamic_sampling=True),
    "papo_d": dict(advantage="grpo", policy_loss="papo", eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, beta=0.0,
                   gamma=0.01, eta1=0.03, eta2=0.03, dynamic_sampling=True),
    # VPPO (arXiv 2510.09285): DAPO + entropy penalty 0.06 on the sampled-token NLL, token filter p = 0.4 and
    # advantage shaping s_min = 0.9 from the masked view (mask ratio 0.5)
    "vppo": dict(advantage="grpo", policy_loss="papo", eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, beta=0.0,
                 gamma=0.0, eta1=0.06, eta2=0.0, dynamic_sampling=True, mask_ratio=0.5, consumers=["vppo"],
                 vppo_token_fraction=0.4, vppo_s_min=0.9),
}

_CHOICES = {
    "model.preset": ("tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b",
                     "qwen3-vl-tiny", "qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b"),
    "model.transformer_impl": ("local", "transformer_engine"),
    "model.fp8": (None, "e4m3", "hybrid"),
    "model.fp8_recipe": ("delayed", "tensorwise", "blockwise", "mxfp8"),
    "model.params_dtype": ("float32", "bfloat16"),
    "data.tokenizer.type": ("sentencepiece", "huggingface"),
    "algorithm.preset": tuple(ALGORITHM_PRESETS),
    "algorithm.loss_agg": ("token-mean", "seq-mean-token-mean", "microbatch-token-mean"),
    "algorithm.vppo_stats": ("global", "reference"),
    "optimizer.schedule": ("constant", "cosine"),
}


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the field and the fix."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML / command-line value to the field's declared type, or say what was expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, (bool, list, tuple, dict)) or value is None:
            raise ConfigError(f"{path}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
        try:
            num = float(value) if tp is float else int(str(value), 0) if isinstance(value, str) else value
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and (not isinstance(num, int) and not float(num).is_integer()):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return tp(num)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return list(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    return value


def _build(cls, data: Any, path: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    types = _field_types(cls)
    if cls is DataConfig:
        data = _removed_data_fields(data)
    unknown = sorted(set(data) - set(types))
    if unknown:
        where = path or "the top level"
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {where}; valid keys are: {', '.join(sorted(types))}"
        )
    if cls is AlgorithmConfig:
        preset = data.get("preset", AlgorithmConfig.preset)
        if preset not in ALGORITHM_PRESETS:
            raise ConfigError(f"algorithm.preset: unknown preset {preset!r}; choose one of "
                              f"{', '.join(ALGORITHM_PRESETS)}")
        data = {**ALGORITHM_PRESETS[preset], **data}
    kwargs = {k: _coerce(v, types[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _removed_data_fields(data: dict) -> dict:
    """``data.eval_shards`` (read by nothing) gave way to ``data.val_shards``: null is dropped (configs saved by
    older runs hold it), a value is an error naming the replacement."""
    if data.get("eval_shards") is not None:
        raise ConfigError("data.eval_shards was removed (nothing read it); set data.val_shards for validation during "
                          "training (with training.eval_interval), or run `megatron-papo evaluate --data SHARDS`")
    return {k: v for k, v in data.items() if k != "eval_shards"}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set training.rl_steps=10")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Build a validated :class:`Config` from an optional YAML file, an optional base dict and ``--set`` items."""
    tree: dict = {} if base is None else _deep_copy(base)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        tree = _merge(tree, loaded)
    apply_overrides(tree, overrides or [])
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _merge(a: dict, b: dict) -> dict:
    out = _deep_copy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _get(cfg, dotted: str):
    node = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def validate(cfg: Config) -> None:
    """Check ranges and cross-field rules; raise :class:`ConfigError` naming the field and the fix."""
    for dotted, choices in _CHOICES.items():
        if _get(cfg, dotted) not in choices:
            raise ConfigError(f"{dotted}: {_get(cfg, dotted)!r} is not one of {', '.join(map(str, choices))}")
    from megatron_papo.config_checks import check_config

    check_config(cfg)
    positive = ["parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size", "rollout.n",
                "training.prompts_per_step", "training.prompts_per_update", "training.micro_batch_size",
                "training.ppo_epochs", "algorithm.mask_patch_size", "data.max_prompt_length",
                "rollout.max_new_tokens", "algorithm.dynamic_sampling_max_tries", "training.reward_workers"]
    for dotted in positive:
        if _get(cfg, dotted) is not None and _get(cfg, dotted) < 1:
            raise ConfigError(f"{dotted} must be >= 1, got {_get(cfg, dotted)}")
    nonneg = ["training.rl_steps", "training.warmup_sft_steps", "rollout.top_k", "training.max_skipped_steps",
              "training.seed", "training.reward_timeout_s", "data.max_member_bytes", "data.max_image_pixels",
              "data.max_sample_pixels",
              "algorithm.beta", "algorithm.gamma", "algorithm.eta1", "algorithm.eta2", "optimizer.lr",
              "optimizer.weight_decay", "optimizer.clip_grad", "checkpoint.keep_last", "checkpoint.save_interval",
              "data.shuffle_buffer", "data.num_workers", "parallel.world_size", "training.cpu_threads",
              "training.max_tokens_per_micro_batch"]
    for dotted in nonneg:
        if _get(cfg, dotted) < 0:
            raise ConfigError(f"{dotted} must be >= 0, got {_get(cfg, dotted)}")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.rollout.temperature < 0:
        raise ConfigError(f"rollout.temperature must be >= 0 (0: greedy), got {cfg.rollout.temperature}")
    if not (cfg.rollout.max_batch_rows == 0 or cfg.rollout.max_batch_rows >= cfg.rollout.n):
        raise ConfigError(f"rollout.max_batch_rows must be 0 (no cap) or >= rollout.n ({cfg.rollout.n}: a prompt's "
                          f"rows run together), got {cfg.rollout.max_batch_rows}")
    if not 0.0 <= cfg.algorithm.mask_ratio <= 1.0:
        raise ConfigError(f"algorithm.mask_ratio must be in [0, 1], got {cfg.algorithm.mask_ratio}")
    a = cfg.algorithm
    if not 0 <= a.dynamic_sampling_min < a.dynamic_sampling_max <= 1:
        raise ConfigError("algorithm.dynamic_sampling_min/max must satisfy 0 <= min < max <= 1, got "
                          f"{a.dynamic_sampling_min} and {a.dynamic_sampling_max}")
    if a.eps_low < 0 or a.eps_high < 0 or a.dual_clip_c <= 1:
        raise ConfigError("algorithm.eps_low/eps_high must be >= 0 and algorithm.dual_clip_c > 1")
    t = cfg.training
    if t.prompts_per_step % t.prompts_per_update:
        raise ConfigError(f"training.prompts_per_step ({t.prompts_per_step}) must be a multiple of "
                          f"training.prompts_per_update ({t.prompts_per_update})")
    longest = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    if 0 < t.max_tokens_per_micro_batch < longest:
        raise ConfigError(f"training.max_tokens_per_micro_batch ({t.max_tokens_per_micro_batch}) must hold the longest "
                          f"row, data.max_prompt_length + rollout.max_new_tokens = {longest}; raise it (or 0: off)")
    if cfg.parallel.sequence_parallel and t.max_tokens_per_micro_batch % cfg.parallel.tensor_model_parallel_size:
        raise ConfigError("training.max_tokens_per_micro_batch must be a multiple of "
                          "parallel.tensor_model_parallel_size under sequence parallelism")
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1; set it "
                          "to false or raise the tensor-parallel size")
    if cfg.model.fp8 is not None and cfg.model.transformer_impl != "transformer_engine":
        raise ConfigError("model.fp8 needs model.transformer_impl=transformer_engine (Transformer Engine on a "
                          "GPU); set model.fp8=null to train without FP8")
    _validate_views(cfg.algorithm)
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(f"data.min_pixels ({cfg.data.min_pixels}) must not exceed data.max_pixels "
                          f"({cfg.data.max_pixels})")
    _validate_eval(cfg.training, cfg.data)


def _validate_eval(t: TrainingConfig, d: DataConfig) -> None:
    for name in ("eval_interval", "eval_limit"):
        if getattr(t, name) < 0:
            raise ConfigError(f"training.{name} must be >= 0, got {getattr(t, name)}")
    if t.eval_k < 1:
        raise ConfigError(f"training.eval_k must be >= 1, got {t.eval_k}")
    if t.eval_interval and not d.val_shards:
        raise ConfigError("training.eval_interval > 0 needs data.val_shards (the validation shards); set it, or "
                          "training.eval_interval=0")


def _validate_views(a: AlgorithmConfig) -> None:
    if not 0.0 < a.vppo_token_fraction <= 1.0:
        raise ConfigError(f"algorithm.vppo_token_fraction must be in (0, 1], got {a.vppo_token_fraction}")
    if not 0.0 <= a.vppo_s_min <= 1.0:
        raise ConfigError(f"algorithm.vppo_s_min must be in [0, 1], got {a.vppo_s_min}")
    if a.noise_sigma < 0:
        raise ConfigError(f"algorithm.noise_sigma must be >= 0, got {a.noise_sigma}")
    from megatron_papo.algorithms.consumers import check_views_and_consumers   # registries: imported when used

    try:
        check_views_and_consumers(a)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def describe_fields(cls=Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, doc) for every leaf field: documentation generated from the comments above fields."""
    import inspect

    out = []
    src = inspect.getsource(cls).splitlines()
    docs: dict[str, str] = {}
    comment = ""
    for line in src:
        s = line.strip()
        if s.startswith("#"):
            comment = s.lstrip("# ")
        elif ":" in s and not s.startswith(("class", "@", '"')):
            docs[s.split(":")[0]] = comment
            comment = ""
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            out += describe_fields(tp, f"{prefix}{name}.")
        else:
            out.append((prefix + name, docs.get(name, "")))
    return out
