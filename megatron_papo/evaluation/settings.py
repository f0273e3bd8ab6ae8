"""Everything that decides an evaluation's numbers, in one record that goes into its JSON (so runs can be paired
later), and the published protocol of the PAPO evaluation harness (``--protocol papo-eval``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

# the settings two runs must share to be paired by `megatron-papo compare` (checkpoint, seed and layout may differ)
PAIRING_KEYS = ("k", "temperature", "top_p", "top_k", "max_new_tokens", "min_pixels", "max_pixels",
                "harness_pixels", "protocol", "mask_ratio", "mask_patch_size", "mask_fill")
# ... except these when both runs follow the same protocol: it sets them per model family (processor_pixels)
PROTOCOL_FAMILY_KEYS = ("min_pixels", "max_pixels")


@dataclass(frozen=True)
class EvalSettings:
    k: int = 8                                  # answers sampled per question (avg@k, pass@k)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                              # 0: off
    max_new_tokens: int = 512
    seed: int = 0                               # sampling streams and masks, keyed by question index
    perception: bool = False                    # also answer with the masked and the blank image, and the KL
    mask_ratio: float = 0.6                     # PAPO random-patch mask: share of cells blackened
    mask_patch_size: Optional[int] = None       # ... cell size in raw-image pixels (None: the family's patch)
    mask_fill: int = 0                          # ... value of a blackened cell
    min_pixels: Optional[int] = None            # the processor's range (None: the checkpoint's own)
    max_pixels: Optional[int] = None
    harness_pixels: Optional[tuple] = None      # (min, max) area pre-resize of the PAPO harness, None: off
    protocol: Optional[str] = None              # "papo-eval" or None
    batch_size: int = 16                        # questions per generation batch and rank (speed only)
    max_batch_rows: int = 0                     # rows in flight in the engine at most (memory only; 0: no cap)
    lean_decode: bool = True                    # the engine's lean decode step where supported (speed only)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.max_batch_rows == 0 or self.max_batch_rows >= self.k):
            raise ValueError(f"--max-batch-rows must be 0 (no cap) or >= --k ({self.k}), got {self.max_batch_rows}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"--mask-ratio must be in [0, 1], got {self.mask_ratio}")

    def sampling(self):
        from megatron_papo.rollout import SamplingParams

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["harness_pixels"] = list(self.harness_pixels) if self.harness_pixels else None
        d.pop("batch_size")
        d.pop("max_batch_rows")
        d.pop("lean_decode")
        return d


# The published evaluation (PAPO-Eval on LLaMA-Factory + vLLM): avg@8 at temperature 1.0, top-p 1.0, top-k 50,
# 2,048 new tokens; images first scaled into 32*32 .. 768*768 pixels, then the processor's own range. It was
# published on Qwen2.5-VL (56*56 .. 28*28*16384); each family takes its published processor's range
# (``Family.published_pixels``, see processor_pixels), a Qwen3-VL checkpoint 65,536 .. 16,777,216.
PAPO_EVAL = dict(k=8, temperature=1.0, top_p=1.0, top_k=50, max_new_tokens=2048, harness_pixels=(32 * 32, 768 * 768),
                 protocol="papo-eval")
PROTOCOLS = {"papo-eval": PAPO_EVAL}


def processor_pixels(settings: EvalSettings, family) -> tuple:
    """(min, max) pixels of the image processor for a checkpoint of ``family``: the settings' own range, else
    under a protocol the family's published one, else (None, None): the checkpoint's own processor."""
    if settings.min_pixels is not None:
        return settings.min_pixels, settings.max_pixels
    if settings.protocol is not None:
        return family.published_pixels
    return None, None


def settings_from_args(args) -> EvalSettings:
    """CLI arguments -> settings; ``--protocol`` fills its values, flags given explicitly are refused when they
    contradict it (a protocol run must be the protocol)."""
    base = dict(k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                max_new_tokens=args.max_new_tokens, seed=args.seed, perception=args.perception,
                mask_ratio=args.mask_ratio, batch_size=args.batch_size,
                max_batch_rows=getattr(args, "max_batch_rows", None))
    if not args.protocol:
        return EvalSettings(**{k: (v if v is not None else _DEFAULTS[k]) for k, v in base.items()})
    proto = PROTOCOLS[args.protocol]
    clash = [f"--{k.replace('_', '-')} {base[k]} (protocol: {proto[k]})" for k in proto
             if k in base and base[k] is not None and base[k] != proto[k]]
    if clash:
        raise ValueError(f"--protocol {args.protocol} fixes these settings: {', '.join(clash)}; drop the flags "
                         "or drop --protocol")
    merged = {k: v for k, v in base.items() if v is not None}
    merged.update(proto)
    return EvalSettings(**{**{k: _DEFAULTS[k] for k in base}, **merged})


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalSettings)}
