"""Section 2 of the GPU check: megatron_papo's rollout engine against transformers ``generate``, same weights
and device, tokens/s at n = 8 (prompt sharing) and n = 1.

Legend: z the section's size dict (hidden, layers, vocab, prompts, prompt_len, new_tokens).
"""

from __future__ import annotations

import tempfile

from .common import FAIL, OK, engine_from_hf, hf_tiny, row


def section_rollout(args) -> None:
    import torch

    from megatron_papo.data.prompts import PromptInputs
    from megatron_papo.platform import Timer, device, init_model_parallel
    from megatron_papo.rollout import SamplingParams

    init_model_parallel(1, 1)
    z = args.sizes["rollout"]
    with tempfile.TemporaryDirectory() as hf_dir:
        hf = hf_tiny(hf_dir, z["hidden"], z["layers"], z["vocab"]).to(device())
        engine = engine_from_hf(hf_dir)
    for n, prompts in ((8, z["prompts"]), (1, z["prompts"] * 8)):
        ids = torch.randint(0, z["vocab"] - 8, (prompts, z["prompt_len"]), generator=torch.Generator().manual_seed(1))
        new = z["new_tokens"]

        def hf_run(k=new):
            x = ids.to(device())
            return hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                               top_p=1.0, top_k=0, num_return_sequences=n, max_new_tokens=k, min_new_tokens=k,
                               eos_token_id=None, pad_token_id=0)

        def engine_run(k=new):
            return engine.generate([PromptInputs(r.clone(), None, None) for r in ids], n,
                                   SamplingParams(temperature=1.0, max_new_tokens=k), seed=0)

        with torch.no_grad():
            hf_run(2), engine_run(2)                                   # one-time costs out of the timing
            with Timer() as t_hf:
                out = hf_run()
            with Timer() as t_en:
                res = engine_run()
        tokens = prompts * n * new
        ok = tuple(out.shape) == (prompts * n, z["prompt_len"] + new) and tuple(res.response_ids.shape) == (
            prompts * n, new)
        ratio = t_hf.seconds / t_en.seconds
        row("2 rollout", f"engine tokens/s, n={n} ({prompts}x{n} rows, {new} new)",
            f"{tokens / t_en.seconds:.0f} (ratio {ratio:.2f})", f"{tokens / t_hf.seconds:.0f} transformers",
            OK if ok else FAIL)
