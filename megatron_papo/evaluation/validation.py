"""In-training validation: a fixed subset of ``data.val_shards`` (the first ``training.eval_limit`` questions)
evaluated every ``training.eval_interval`` RL steps with the policy being trained: avg@k, pass@k and the image
reliance (masked and blank image) with the real-vs-masked KL, to the console and to tensorboard under ``val/``.

Sampling uses the run's rollout settings and seed with counter-based streams, and the masks their own seeded
generators, so validation draws nothing from the training's random state: a run with validation trains exactly
as one without.
"""

from __future__ import annotations

from typing import Optional

from megatron_papo.evaluation.data import load_questions
from megatron_papo.evaluation.run import evaluate
from megatron_papo.evaluation.settings import EvalSettings

_LOGGED = ("avg@k", "pass@k", "avg@k_masked", "avg@k_blank", "reliance_masked", "reliance_blank", "kl_exact",
           "kl_k3", "response_length")


class Validator:
    def __init__(self, cfg, questions: list):
        r, a, t = cfg.rollout, cfg.algorithm, cfg.training
        self.interval, self.questions = t.eval_interval, questions
        self.max_prompt_length = cfg.data.max_prompt_length
        self.settings = EvalSettings(k=t.eval_k, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                     max_new_tokens=r.max_new_tokens, seed=t.seed, perception=True,
                                     mask_ratio=a.mask_ratio, mask_patch_size=a.mask_patch_size, mask_fill=a.mask_fill,
                                     max_batch_rows=max(r.max_batch_rows, t.eval_k) if r.max_batch_rows else 0)

    @classmethod
    def build(cls, cfg) -> Optional["Validator"]:
        """None unless ``training.eval_interval`` > 0."""
        if not cfg.training.eval_interval:
            return None
        return cls(cfg, load_questions(cfg.data.val_shards, cfg.training.eval_limit, field="data.val_shards"))

    def maybe_run(self, ctx, step: int, logger) -> Optional[dict]:
        """Evaluate at every ``interval``-th step (all ranks take part); returns the ``val/`` metrics then."""
        if step % self.interval:
            return None
        res = evaluate(ctx.policy, ctx.tokenizer, ctx.processor, self.questions, self.settings, progress=False,
                       max_prompt_length=self.max_prompt_length)
        m = res["datasets"]["overall"]
        metrics = {f"val/{key}": float(m[key]) for key in _LOGGED}
        if logger.writer is not None:
            for key, value in metrics.items():
                logger.writer.add_scalar(key, value, step)
            logger.writer.flush()
        k = self.settings.k
        logger.info(f"validation step {step}: avg@{k} {m['avg@k']:.4f} | pass@{k} {m['pass@k']:.4f} | masked "
                    f"{m['avg@k_masked']:.4f} | blank {m['avg@k_blank']:.4f} | reliance {m['reliance_masked']:+.4f}"
                    f" / {m['reliance_blank']:+.4f} | kl {m['kl_exact']:.3g} | {len(self.questions)} questions, "
                    f"{res['seconds']:.1f} s" + (f", {len(res['skipped'])} skipped" if res["skipped"] else ""))
        return metrics
