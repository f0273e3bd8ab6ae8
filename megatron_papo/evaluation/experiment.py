"""``megatron-papo experiment --config EXP.yaml``: arms x seeds of RL training, each evaluated with the perception
metrics on held-out data, summarised with paired-by-seed statistics.

Design (the variance reduction an experiment on a small budget needs):
- per seed, ONE supervised warm-start (``training.rl_steps=0`` saves ``step_0``); every arm of that seed starts
  from it through ``model.load`` (weights only: step counter, optimizer and data position start afresh, and the
  reference model holds the same weights), with the same ``training.seed``, so the arms of a seed read the same
  prompts in the same order and draw their first rollouts from the same streams (common random numbers);
- training data and held-out data are synthetic shards made once per experiment from two different seeds;
- every final checkpoint (and each warm-start, to see the image being forgotten during RL) is evaluated with
  ``megatron-papo evaluate --perception`` on the held-out shards;
- a control arm (the same algorithm with a negligible coefficient) measures run-to-run drift: every difference
  is read against it (:mod:`megatron_papo.evaluation.experiment_summary`).

Every unit of work is a subprocess of the real command line (``train`` / ``evaluate``) writing into its own
directory, so a rerun skips what is finished (an ``eval.json`` exists) and resumes an interrupted training from
its newest checkpoint (``checkpoint.resume=auto``). A run directory remembers the config it was made with; a
changed spec is refused rather than mixed into old results.

Layout of ``out_dir``: ``data/{train,heldout}``, ``warm/seed_<s>/``, ``runs/<arm>/seed_<s>/`` (``config.yaml``,
``checkpoints/``, ``tb/``, ``train.log``, ``eval.json``), ``summary.json``, ``summary.md``, ``summary.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from megatron_papo.config import ConfigError, apply_overrides, load_config, to_dict


@dataclass
class Arm:
    name: str
    set: list = field(default_factory=list)         # --set overrides of this arm
    config: Optional[str] = None                      # a training YAML merged over the experiment's base


@dataclass
class ExperimentSpec:
    out_dir: str
    arms: list                                        # [Arm]
    seeds: list                                       # training seeds; each gets its own warm-start
    base: Optional[str] = None                        # training YAML (None: the embedded CPU demo config)
    set: list = field(default_factory=list)           # overrides for every run (warm-starts included)
    warm_start_steps: int = 300                       # supervised steps of the per-seed warm-start
    warm_start_set: list = field(default_factory=list)  # overrides for the warm-starts only
    train_samples: int = 2000                         # synthetic training samples (made once)
    train_data_seed: int = 0                          # synthetic seed of the training data
    heldout_samples: int = 200                        # synthetic held-out samples
    heldout_data_seed: int = 1                        # a different seed: questions never trained on
    eval_k: int = 4                                   # answers per held-out question
    eval_max_new_tokens: int = 16
    eval_seed: int = 0                                # sampling / mask seed of every evaluation (paired)
    control: Optional[str] = None                     # the arm measuring run-to-run drift
    baseline: Optional[str] = None                    # the arm others are compared against (default: first)
    forget_threshold: float = 0.05                    # reliance drop (blank image) during RL counted as forgetting
    bootstrap_resamples: int = 10_000

    @property
    def arm_names(self) -> list:
        return [a.name for a in self.arms]


_SPEC_KEYS = {f.name for f in dataclasses.fields(ExperimentSpec)}


def load_spec(path: str) -> ExperimentSpec:
    """Parse and check an experiment YAML; relative paths are taken from the YAML's folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment config {path!r} does not exist; pass a YAML file to --config")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment config {path!r} must hold a mapping (out_dir, arms, seeds, ...)")
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"experiment config: unknown key(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(_SPEC_KEYS))}")
    for key in ("out_dir", "arms", "seeds"):
        if key not in raw:
            raise ConfigError(f"experiment config: {key} is required")
    arms = []
    for i, a in enumerate(raw["arms"] or []):
        if not isinstance(a, dict) or "name" not in a or set(a) - {"name", "set", "config"}:
            raise ConfigError(f"experiment config: arms[{i}] must be a mapping with name and optional set / config")
        cfg = a.get("config")
        arms.append(Arm(str(a["name"]), list(a.get("set") or []), str(p.parent / cfg) if cfg else None))
    base = raw.get("base")
    spec = ExperimentSpec(**{**raw, "arms": arms, "seeds": [int(s) for s in raw["seeds"] or []],
                             "base": str(p.parent / base) if base else None})
    check_spec(spec)
    return spec


def check_spec(spec: ExperimentSpec) -> None:
    names = spec.arm_names
    if len(names) < 1 or len(set(names)) != len(names):
        raise ConfigError(f"experiment config: arms must be non-empty with distinct names, got {names}")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"experiment config: seeds must be a non-empty list of distinct integers, got {spec.seeds}")
    for key in ("control", "baseline"):
        if getattr(spec, key) is not None and getattr(spec, key) not in names:
            raise ConfigError(f"experiment config: {key} {getattr(spec, key)!r} is not an arm; arms: {names}")
    if spec.eval_k < 1 or spec.heldout_samples < 1 or spec.warm_start_steps < 0:
        raise ConfigError("experiment config: eval_k and heldout_samples must be >= 1, warm_start_steps >= 0")
    for arm in spec.arms:                              # every run's config must load before anything starts
        run_config(spec, arm, spec.seeds[0])
    warm_config(spec, spec.seeds[0])


# --- the configs of each unit of work ------------------------------------------------------------------------
def _base_tree(spec: ExperimentSpec) -> dict:
    if spec.base:
        tree = yaml.safe_load(Path(spec.base).read_text()) or {}
    else:
        from megatron_papo.training.entry import default_config_tree

        tree = default_config_tree()
    return apply_overrides(tree, spec.set)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _data_sets(spec: ExperimentSpec, seed: int, run_dir: Path) -> list:
    out = Path(spec.out_dir)
    return [f"training.seed={seed}", f"data.train_shards={out / 'data' / 'train'}", "data.synthetic_if_missing=false",
            f"checkpoint.dir={run_dir / 'checkpoints'}", "checkpoint.resume=auto",
            f"logging.tensorboard_dir={run_dir / 'tb'}", "logging.progress=false",
            "training.eval_interval=0"]          # evaluated by the experiment itself, on its held-out shards


def warm_dir(spec: ExperimentSpec, seed: int) -> Path:
    return Path(spec.out_dir) / "warm" / f"seed_{seed}"


def run_dir(spec: ExperimentSpec, arm: str, seed: int) -> Path:
    return Path(spec.out_dir) / "runs" / arm / f"seed_{seed}"


def warm_config(spec: ExperimentSpec, seed: int) -> dict:
    tree = apply_overrides(_base_tree(spec), spec.warm_start_set + [
        "training.rl_steps=0", f"training.warmup_sft_steps={spec.warm_start_steps}",
        "checkpoint.save_interval=0", *_data_sets(spec, seed, warm_dir(spec, seed))])
    return to_dict(load_config(None, [], base=tree))


def run_config(spec: ExperimentSpec, arm: Arm, seed: int) -> dict:
    tree = _base_tree(spec)
    if arm.config:
        tree = _merge(tree, yaml.safe_load(Path(arm.config).read_text()) or {})
    tree = apply_overrides(tree, arm.set + [
        f"model.load={warm_dir(spec, seed) / 'checkpoints' / 'step_0'}", "training.warmup_sft_steps=0",
        *_data_sets(spec, seed, run_dir(spec, arm.name, seed))])
    return to_dict(load_config(None, [], base=tree))


# --- running ---------------------------------------------------------------------------------------------------
Launcher = Callable[[list, Path], int]


def subprocess_launcher(args: list, log_file: Path) -> int:
    """Run ``python -m megatron_papo.cli ARGS``, its output appended to ``log_file``; returns the exit code."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(log_file, "a") as log:
        return subprocess.run([sys.executable, "-m", "megatron_papo.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                              env=env).returncode


def _claim(directory: Path, config: dict) -> None:
    """Create ``directory`` with its ``config.yaml``, or check that it was made with the same config."""
    path = directory / "config.yaml"
    if path.is_file():
        if yaml.safe_load(path.read_text()) != config:
            raise ValueError(f"{directory} was made with a different config; delete it or choose another out_dir")
        return
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _final_checkpoint(directory: Path, steps: int) -> Path:
    return directory / "checkpoints" / f"step_{steps}"


def _train(directory: Path, config: dict, launch: Launcher, log) -> None:
    _claim(directory, config)
    final = _final_checkpoint(directory, config["training"]["rl_steps"])
    if (final / "metadata.json").is_file():
        return
    log(f"train {directory}")
    if launch(["train", "--config", str(directory / "config.yaml")], directory / "train.log") != 0:
        raise RuntimeError(f"training failed; see {directory / 'train.log'} (rerun the experiment to resume)")


def _evaluate(spec: ExperimentSpec, directory: Path, steps: int, launch: Launcher, log) -> None:
    out = directory / "eval.json"
    if out.is_file():
        return
    log(f"evaluate {directory}")
    tmp = directory / "eval.json.tmp"
    args = ["evaluate", "--checkpoint", str(_final_checkpoint(directory, steps)), "--data",
            str(Path(spec.out_dir) / "data" / "heldout"), "--perception", "--k", str(spec.eval_k),
            "--max-new-tokens", str(spec.eval_max_new_tokens), "--seed", str(spec.eval_seed), "--out", str(tmp),
            "--no-progress"]
    if launch(args, directory / "eval.log") != 0:
        raise RuntimeError(f"evaluation failed; see {directory / 'eval.log'}")
    os.replace(tmp, out)                            # eval.json appears only complete: it marks the unit done


def make_data(spec: ExperimentSpec) -> None:
    """The training and held-out synthetic shards (made once; kept when present)."""
    from megatron_papo.data.synthetic import ensure_synthetic_shards

    root = Path(spec.out_dir) / "data"
    ensure_synthetic_shards(str(root / "train"), spec.train_samples, spec.train_data_seed)
    ensure_synthetic_shards(str(root / "heldout"), spec.heldout_samples, spec.heldout_data_seed)


def run_experiment(spec: ExperimentSpec, launch: Launcher = subprocess_launcher, log=print,
                   seeds: Optional[list] = None) -> dict:
    """Every seed's warm-start, then every arm of that seed, each trained and evaluated (finished units skipped);
    then the summary files over the seeds whose runs are all finished. ``seeds``: run only these (e.g. two
    invocations on two cores, each with half of the seeds). Returns the summary."""
    from megatron_papo.evaluation.experiment_summary import summarize_experiment, write_summary

    make_data(spec)
    todo = spec.seeds if seeds is None else [s for s in spec.seeds if s in seeds]
    total, done = len(todo) * (len(spec.arms) + 1), 0
    for seed in todo:
        wd = warm_dir(spec, seed)
        _train(wd, warm_config(spec, seed), launch, log)
        _evaluate(spec, wd, 0, launch, log)
        done += 1
        for arm in spec.arms:
            cfg = run_config(spec, arm, seed)
            rd = run_dir(spec, arm.name, seed)
            _train(rd, cfg, launch, log)
            _evaluate(spec, rd, cfg["training"]["rl_steps"], launch, log)
            done += 1
            log(f"[{done}/{total}] {arm.name} seed {seed} done")
    finished = [s for s in spec.seeds if all((run_dir(spec, a, s) / "eval.json").is_file() for a in spec.arm_names)]
    if not finished:
        return {}
    summary = summarize_experiment(dataclasses.replace(spec, seeds=finished))
    summary["missing_seeds"] = [s for s in spec.seeds if s not in finished]
    write_summary(spec, summary)
    return summary


def experiment_command(args) -> int:
    spec = load_spec(args.config)
    seeds = [] if args.summarize else [int(x) for x in args.seeds.split(",")] if args.seeds else None
    try:
        summary = run_experiment(spec, seeds=seeds)
    except RuntimeError as e:
        print(f"megatron-papo experiment: {e}", file=sys.stderr)
        return 1
    from megatron_papo.evaluation.experiment_summary import format_markdown

    if not summary:
        print("no seed has all its arms finished yet: no summary")
        return 0
    print(format_markdown(summary))
    print(f"summary: {Path(spec.out_dir) / 'summary.md'} (+ summary.json, summary.png)")
    return 0


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
