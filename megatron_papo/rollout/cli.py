"""``megatron-papo generate``: answer one prompt (with images) from a checkpoint, printed to stdout.

Runs on one process, or under torchrun with the world size as the tensor-parallel size. The checkpoint is one
written by ``megatron-papo train`` or by ``tools/convert_checkpoint.py hf-to-mcore`` (see
:mod:`megatron_papo.training.loading`).
"""

from __future__ import annotations

import os
import sys


def generate_command(args) -> int:
    import torch.distributed as dist

    from megatron_papo.data.prompts import encode_prompt
    from megatron_papo.platform import init_distributed, init_model_parallel, shutdown
    from megatron_papo.rollout.engine import MegatronEngine
    from megatron_papo.rollout.sampling import SamplingParams
    from megatron_papo.training.loading import check_checkpoint, load_for_inference

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_checkpoint(args.checkpoint)  # fails with the fix before any process group starts
    missing = [p for p in args.image if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--image: no such file(s): {', '.join(missing)}")
    images = [_open_image(p) for p in args.image]
    info = init_distributed()
    init_model_parallel(tp=info.world_size, pp=1, seed=args.seed)
    try:
        loaded = load_for_inference(args.checkpoint)
        tokenizer = loaded.tokenizer
        prompt = encode_prompt(tokenizer, loaded.processor, args.prompt, images)
        engine = MegatronEngine(loaded.model, max_seq_len=len(prompt) + args.max_new_tokens, tokenizer=tokenizer)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, greedy=args.greedy,
                                max_new_tokens=args.max_new_tokens)
        out = engine.generate([prompt], 1, params, seed=args.seed)
        if info.rank == 0:
            text = tokenizer.decode(out.response_ids[0][out.response_mask[0]].tolist())
            print(text)
            print(f"[{int(out.lengths[0])} tokens, finished by {out.finish_reasons[0]}]", file=sys.stderr)
    finally:
        if dist.is_initialized():
            shutdown()
    return 0


def _open_image(path: str):
    """The image at ``path`` as RGB, or a ValueError naming the file (the CLI prints one line)."""
    from PIL import Image, UnidentifiedImageError

    from megatron_papo.data.limits import DEFAULT_LIMITS
    from megatron_papo.data.shards import open_image

    try:
        with open(path, "rb") as f:
            image = open_image(f.read(), DEFAULT_LIMITS)
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"--image {path}: not a readable image ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. the too-large check
        raise ValueError(f"--image {path}: {exc}") from None
