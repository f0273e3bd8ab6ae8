"""What every rollout backend takes and returns, so the trainer does not depend on one engine.

Legend: N = len(prompts) * n sampled sequences (prompt-major: prompt 0's n samples first), T = longest response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from megatron_papo.rollout.sampling import SamplingParams

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class RolloutOutput:
    sequences: list  # N LongTensors [s_i + len_i]: prompt ids followed by response ids
    response_ids: torch.Tensor  # [N, T] int64, right-padded with the pad id
    response_mask: torch.Tensor  # [N, T] bool, True on generated tokens (EOS / stop tokens included)
    logprobs: torch.Tensor  # [N, T] float32, log-probs under the sampling distribution (0 on padding)
    lengths: torch.Tensor  # [N] int64 response lengths
    finish_reasons: list  # N strings: "eos" | "stop" | "length"
    prompt_index: torch.Tensor  # [N] int64, which prompt each row answers

    def __len__(self) -> int:
        return len(self.finish_reasons)


@runtime_checkable
class RolloutBackend(Protocol):
    """A generator of n responses per prompt from the current policy (the built-in engine, or e.g. vLLM)."""

    def generate(self, prompts: Sequence, n: int, params: SamplingParams, seed: int) -> RolloutOutput:
        """prompts: ``PromptInputs`` (input_ids [s], pixel_values [P, 1176] | None, image_grid_thw [k, 3] | None).
        Same ``seed`` and inputs must give the same output."""
        ...


def empty_output(prompts: Sequence, n: int, pad_id: int) -> RolloutOutput:
    """The result of generating zero new tokens: the prompts alone, N empty responses."""
    seqs = [p.input_ids.clone() for p in prompts for _ in range(n)]
    num = len(seqs)
    return RolloutOutput(
        sequences=seqs, response_ids=torch.full((num, 0), pad_id, dtype=torch.long),
        response_mask=torch.zeros(num, 0, dtype=torch.bool), logprobs=torch.zeros(num, 0),
        lengths=torch.zeros(num, dtype=torch.long), finish_reasons=["length"] * num,
        prompt_index=torch.arange(len(prompts)).repeat_interleave(n),
    )
