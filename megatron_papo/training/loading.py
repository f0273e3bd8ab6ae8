"""Checkpoints for inference (``megatron-papo generate`` / ``evaluate``), in either of the two forms users have:

- a training checkpoint written by ``megatron-papo train``: ``step_<N>/`` (or the ``checkpoint.dir`` holding them,
  the newest is taken); the model and tokenizer are rebuilt from the resolved config stored in it;
- a converted checkpoint written by ``tools/convert_checkpoint.py hf-to-mcore``: ``megatron_papo_model.json`` +
  ``model/``, with the Hugging Face tokenizer files (``tokenizer.json``) or a sentencepiece ``tokenizer.model``
  copied into the same directory; images are processed with the pixel range of its ``preprocessor_config.json``
  (as transformers' processor of that checkpoint does).

Both load at whatever tensor-parallel size the caller initialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_papo.config import Config, DataConfig, load_config

CONVERTED_META = "megatron_papo_model.json"


@dataclass
class InferenceModel:
    model: object        # eval-mode Qwen25VLModel (this rank's part)
    tokenizer: object
    processor: object    # the model family's image processor (Qwen2VLImageProcessor with its patch, mean/std)
    seed: int            # the run's seed (0 for converted checkpoints)
    path: Path           # the directory actually loaded


def resolve_checkpoint(path: str) -> Path:
    """A converted checkpoint, a ``step_<N>`` directory, or a directory holding some (the newest complete one)."""
    import sys

    from megatron_papo.training.checkpoint import find_resume

    p = Path(path)
    if (p / CONVERTED_META).is_file() or (p / "metadata.json").is_file():
        return p
    found = find_resume("auto", p, warn=lambda m: print(f"WARNING: {m}", file=sys.stderr)) if p.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"--checkpoint {path}: not a checkpoint: expected a step_<N> directory of "
                                f"megatron-papo train (or the directory holding them), or the output of "
                                f"tools/convert_checkpoint.py hf-to-mcore ({CONVERTED_META} + model/)")
    return found


def checkpoint_config(path: Path) -> Config:
    """The resolved training config stored in a training checkpoint."""
    from megatron.core import dist_checkpointing

    tree = dist_checkpointing.load_common_state_dict(str(path)).get("config") or {}
    if not tree:
        raise ValueError(f"{path} holds no training config; pass a checkpoint written by megatron-papo train")
    tree.setdefault("model", {})["load"] = None          # the weights come from this checkpoint
    return load_config(None, [], base=tree)


def converted_tokenizer(path: Path):
    from megatron_papo.data.tokenizer import HFTokenizer, SentencePieceTokenizer

    if (path / "tokenizer.json").is_file():
        return HFTokenizer(str(path))
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(str(path / "tokenizer.model"))
    raise FileNotFoundError(f"{path} holds no tokenizer (tokenizer.json or tokenizer.model); copy the model's "
                            "tokenizer files into the checkpoint directory")


PREPROCESSOR = "preprocessor_config.json"


def converted_processor(path: Path, family):
    """The family's image processor with the pixel range of the checkpoint's own ``preprocessor_config.json``
    (what transformers' processor of that checkpoint uses); without the file, the data config's defaults."""
    import json

    data = DataConfig()
    if not (path / PREPROCESSOR).is_file():
        return family.image_processor(data.min_pixels, data.max_pixels)
    cfg = json.loads((path / PREPROCESSOR).read_text())
    size = cfg.get("size") or {}
    # transformers >= 4.5x writes size.shortest_edge / longest_edge (pixels); older Qwen2-VL files min/max_pixels
    lo, hi = size.get("shortest_edge", cfg.get("min_pixels")), size.get("longest_edge", cfg.get("max_pixels"))
    processor = family.image_processor(lo or data.min_pixels, hi or data.max_pixels)
    for key in ("patch_size", "merge_size", "temporal_patch_size"):
        if key in cfg and cfg[key] != getattr(processor, key):
            raise ValueError(f"{path / PREPROCESSOR}: {key}={cfg[key]} but a {family.name} model takes "
                             f"{getattr(processor, key)}; copy the preprocessor_config.json of that model")
    return processor


def check_checkpoint(path: str) -> Path:
    """Fail early, before any process group starts, with what is missing."""
    p = resolve_checkpoint(path)
    if is_converted(p):
        converted_tokenizer(p)
    return p


def is_converted(p: Path) -> bool:
    """hf-to-mcore output (weights under model/); training checkpoints hold their dist checkpoint at the top and
    also carry a model description for mcore-to-hf."""
    return (p / CONVERTED_META).is_file() and not (p / "metadata.json").is_file()


def load_for_inference(path: str) -> InferenceModel:
    """Build this rank's model from either checkpoint form and load its weights (parallel state initialised)."""
    from megatron_papo.data import build_tokenizer
    from megatron_papo.models import family_of_preset, family_of_spec

    p = resolve_checkpoint(path)
    if is_converted(p):
        from megatron_papo.convert import load_vlm

        model = load_vlm(str(p)).eval()
        processor = converted_processor(p, family_of_spec(model.spec))
        return InferenceModel(model, converted_tokenizer(p), processor, 0, p)
    from megatron_papo.training.checkpoint import load_checkpoint
    from megatron_papo.training.trainer import build_model

    cfg = checkpoint_config(p)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    processor = family_of_preset(cfg.model.preset).image_processor(cfg.data.min_pixels, cfg.data.max_pixels)
    model = build_model(cfg, tokenizer, trainable=False)
    load_checkpoint(p, [model])
    return InferenceModel(model, tokenizer, processor, cfg.training.seed, p)
