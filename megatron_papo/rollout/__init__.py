"""Rollout: n responses per prompt from the current policy, on the trainer's own megatron model.

    engine = MegatronEngine(model, max_seq_len=4096, tokenizer=tok)        # any TP x PP layout
    out = engine.generate(prompts, n=5, params=SamplingParams(top_p=0.99), seed=step)
    out.response_ids, out.logprobs, out.response_mask, out.lengths, out.finish_reasons

``RolloutBackend`` is the interface the trainer uses; ``sampling.sample`` draws from vocab-parallel logits.
"""

from megatron_papo.rollout.base import RolloutBackend, RolloutOutput
from megatron_papo.rollout.engine import MegatronEngine
from megatron_papo.rollout.sampling import SamplingParams, log_probs_of, sample

__all__ = ["MegatronEngine", "RolloutBackend", "RolloutOutput", "SamplingParams", "log_probs_of", "sample"]
