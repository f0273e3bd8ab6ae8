"""Evaluation: avg@k / pass@k per data set at any TP x PP x DP, perception metrics (masked and blank image,
image reliance, real-vs-masked KL), the published PAPO protocol and paired comparisons of runs."""

from megatron_papo.evaluation.data import iter_questions, load_questions
from megatron_papo.evaluation.perception import image_reliance
from megatron_papo.evaluation.run import evaluate
from megatron_papo.evaluation.settings import EvalSettings

__all__ = ["EvalSettings", "evaluate", "image_reliance", "iter_questions", "load_questions"]
