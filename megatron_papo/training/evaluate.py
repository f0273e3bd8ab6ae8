"""Moved to :mod:`megatron_papo.evaluation`; kept so existing imports keep working."""

from megatron_papo.evaluation.command import evaluate_command
from megatron_papo.evaluation.data import iter_questions as iter_samples
from megatron_papo.evaluation.report import format_table
from megatron_papo.evaluation.run import evaluate

__all__ = ["evaluate", "evaluate_command", "format_table", "iter_samples"]
