"""In-training validation: a fixed subset of ``data.val_shards`` (the first ``training.eval_limit`` questions)
evaluated every ``training.eval_interval`` RL steps with the policy being trained: avg@k, pass@k and the image
reliance (masked and blank image) with the real-vs-masked KL, to the console and to tensorboard under ``val/``.

Sampling uses the run's rollout settings and seed with counter-based streams, and the masks their own seeded
generators, so validation draws nothing from the training's random state: a run with validation trains exactly
as one without.

A break shows as a drop between two validations: each one is compared with the previous on the same questions
(paired per-question accuracy), and a drop larger than ``DROP_SIGMAS`` standard errors of the paired difference
and at least ``DROP_MIN`` is one warning line (console and tensorboard). The run ends with one more validation
when the last step was not validated (:meth:`Validator.finish`), so a break in the final update, which no
training metric can show before it happens, is seen before the checkpoint is used. Measured on the CPU
experiment's seed 10 (200 held-out questions, k=4): the PAPO-G run that broke in its last update fell 0.533 ->
0.264 from the warm start, 7.7 standard errors; the other arms' final checkpoints rose from the warm start, and
between each other (same seed, different algorithms) differed by at most 2.4 standard errors.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_papo.evaluation.data import load_questions
from megatron_papo.evaluation.run import evaluate
from megatron_papo.evaluation.settings import EvalSettings

DROP_SIGMAS = 3.0     # warn when the paired accuracy drop exceeds this many standard errors ...
DROP_MIN = 0.05       # ... and this much accuracy (a tiny, very consistent drop is not a break)
_LOGGED = ("avg@k", "pass@k", "avg@k_masked", "avg@k_blank", "reliance_masked", "reliance_blank", "kl_exact",
           "kl_k3", "response_length")


class Validator:
    def __init__(self, cfg, questions: list):
        r, a, t = cfg.rollout, cfg.algorithm, cfg.training
        self.interval, self.questions = t.eval_interval, questions
        self.max_prompt_length = cfg.data.max_prompt_length
        self.previous: Optional[tuple[int, dict]] = None       # (step, {question index: accuracy}) last validated
        self.settings = EvalSettings(k=t.eval_k, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                     max_new_tokens=r.max_new_tokens, seed=t.seed, perception=True,
                                     mask_ratio=a.mask_ratio, mask_patch_size=a.mask_patch_size, mask_fill=a.mask_fill,
                                     max_batch_rows=max(r.max_batch_rows, t.eval_k) if r.max_batch_rows else 0,
                                     lean_decode=r.lean_decode)

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
        return self.run(ctx, step, logger)

    def finish(self, ctx, step: int, logger) -> Optional[dict]:
        """At the end of a run: validate the final policy unless step ``step`` was just validated."""
        return self.run(ctx, step, logger) if self.previous is None or self.previous[0] != step else None

    def run(self, ctx, step: int, logger) -> dict:
        """Evaluate now, log ``val/`` metrics, and warn on a significant drop since the previous validation."""
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
        self._compare(step, {r["index"]: r["correct"] / r["k"] for r in res["records"]}, logger)
        return metrics

    def _compare(self, step: int, accuracy: dict, logger) -> None:
        if self.previous is not None:
            warning = drop_warning(self.previous[1], accuracy, self.previous[0], step)
            if warning:
                logger.note(warning, step)
        self.previous = (step, accuracy)


def paired_drop(before: dict, after: dict) -> Optional[tuple[float, float, float, int]]:
    """(mean accuracy before, after, standard error of the mean paired difference, questions) over the questions
    both saw (``{question index: accuracy}``); None with fewer than 2 common questions."""
    common = sorted(set(before) & set(after))
    n = len(common)
    if n < 2:
        return None
    diffs = [after[q] - before[q] for q in common]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return sum(before[q] for q in common) / n, sum(after[q] for q in common) / n, math.sqrt(var / n), n


def drop_warning(before: dict, after: dict, step_before, step_after) -> Optional[str]:
    """The warning for a significant accuracy drop between two validations, else None."""
    got = paired_drop(before, after)
    if got is None:
        return None
    a, b, se, n = got
    drop = a - b
    if drop < DROP_MIN or drop <= DROP_SIGMAS * se:
        return None
    return (f"validation accuracy fell {a:.3f} -> {b:.3f} between step {step_before} and step {step_after} "
            f"({n} questions, {drop / max(se, 1e-12):.1f} standard errors): the policy may have broken in between; "
            f"prefer a checkpoint from step {step_before} or before, and look at the reference KL and ppo_kl")
