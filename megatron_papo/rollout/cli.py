"""``megatron-papo generate``: answer one prompt (with images) from a checkpoint, printed to stdout.

Runs on one process, or under torchrun with the world size as the tensor-parallel size. The checkpoint is a
directory written by ``tools/convert_checkpoint.py hf-to-mcore`` (``megatron_papo_model.json`` + ``model/``),
loadable at any layout; the tokenizer is read from the same directory (``tokenizer.json`` of a Hugging Face
model, or a sentencepiece ``tokenizer.model``).
"""

from __future__ import annotations

import os
import sys


def _tokenizer(ckpt_dir: str):
    from megatron_papo.data.tokenizer import HFTokenizer, SentencePieceTokenizer

    if os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json")):
        return HFTokenizer(ckpt_dir)
    if os.path.isfile(os.path.join(ckpt_dir, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(ckpt_dir, "tokenizer.model"))
    raise FileNotFoundError(f"{ckpt_dir} holds no tokenizer (tokenizer.json or tokenizer.model); copy the "
                            "model's tokenizer files into the checkpoint directory")


def generate_command(args) -> int:
    import torch.distributed as dist
    from PIL import Image

    from megatron_papo.convert import load_vlm, read_checkpoint_meta
    from megatron_papo.data.image_processor import Qwen2VLImageProcessor
    from megatron_papo.data.prompts import encode_prompt
    from megatron_papo.platform import init_distributed, init_model_parallel, shutdown
    from megatron_papo.rollout.engine import MegatronEngine
    from megatron_papo.rollout.sampling import SamplingParams

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    read_checkpoint_meta(args.checkpoint)  # fails with the fix before any process group starts
    tokenizer = _tokenizer(args.checkpoint)
    missing = [p for p in args.image if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--image: no such file(s): {', '.join(missing)}")
    images = [Image.open(p).convert("RGB") for p in args.image]
    info = init_distributed()
    init_model_parallel(tp=info.world_size, pp=1, seed=args.seed)
    try:
        model = load_vlm(args.checkpoint).eval()
        prompt = encode_prompt(tokenizer, Qwen2VLImageProcessor(), args.prompt, images)
        engine = MegatronEngine(model, max_seq_len=len(prompt) + args.max_new_tokens, tokenizer=tokenizer)
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
