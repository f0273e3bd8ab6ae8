"""Consumers of the auxiliary-view signals, registered by name (``algorithm.consumers``).

One RL step scores the rows once without gradient with the real images (old log-probs, when not the rollout's) and
with every configured view (``views``), in one batched pass. Each consumer is then one function
``fn(ConsumerInputs, AlgorithmConfig) -> ConsumerOutput``, run once per RL step on the ranks that hold those
log-probs (the last pipeline stage):

- ``tokens``: per-token tensors [N, T] handed to the policy loss by their ``PolicyLossInputs`` name
  (``mask_logp`` for PAPO's perception term, ``pg_mask`` for VPPO's token filter; several ``pg_mask`` multiply);
- ``advantage_scale``: [N] per-response factor multiplied into the advantages (VPPO's shaping);
- ``metrics``: ``{name: (sum, count)}``, reduced exactly over the DP ranks (``reduce_means``).

A consumer declares the view it reads and whether that view is scored in the no-grad pass or rides in every update
micro-batch instead (PAPO with ``perception_grad`` / ``exact_perception_kl``). :func:`view_plan` derives which
views a run generates and scores; :func:`check_views_and_consumers` rejects unknown names and a consumer whose view
``algorithm.views`` leaves out.

Legend: N rows of the RL step on this DP rank (prompt-major), T padded response length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_papo.algorithms.metrics import reduce_means
from megatron_papo.algorithms.signals import view_signal_sums
from megatron_papo.algorithms.views import VIEWS
from megatron_papo.registry import Registry

Tensor = torch.Tensor


@dataclass
class StepLayout:
    """How this rank's rows are cut for the updates (for statistics taken per mini-batch / micro-batch)."""
    rows_per_update: int          # rows of one optimizer step (mini-batch) on this rank
    micro_batch_size: int         # rows per micro-batch
    # each micro-batch's rows (indices into this rank's rows), as the schedule runs them (token-budget packing
    # bins them by length); None: consecutive runs of micro_batch_size rows
    micro_batch_rows: Optional[list] = None


@dataclass
class ConsumerInputs:
    old_logp: Tensor              # [N, T] old policy, real images
    views: dict                   # view name -> [N, T] old policy's log-probs with that view
    response_mask: Tensor         # [N, T] bool
    layout: StepLayout
    group: object = None          # data-parallel group for statistics over the whole RL step (None: this rank)


@dataclass
class ConsumerOutput:
    tokens: dict = field(default_factory=dict)       # PolicyLossInputs name -> [N, T]
    advantage_scale: Optional[Tensor] = None         # [N] float32, multiplied into the advantages
    metrics: dict = field(default_factory=dict)      # name -> (sum, count) 0-dim tensors


ConsumerFn = Callable[[ConsumerInputs, object], ConsumerOutput]


@dataclass(frozen=True)
class ConsumerSpec:
    fn: ConsumerFn
    view: Callable[[object], str]       # algorithm config -> the view it reads
    scored: Callable[[object], bool]    # its view comes from the no-grad pass (else it rides in the update)


CONSUMERS: Registry[ConsumerSpec] = Registry("consumer", "algorithm.consumers")


def register_consumer(name: str, view: Callable[[object], str] = lambda a: "masked",
                      scored: Callable[[object], bool] = lambda a: True):
    """Decorator: make ``fn`` the consumer ``name``, reading the view ``view(cfg)``."""
    def deco(fn: ConsumerFn) -> ConsumerFn:
        CONSUMERS.register(name)(ConsumerSpec(fn, view, scored))
        return fn
    return deco


def active_consumers(a) -> list:
    """The run's consumers: ``algorithm.consumers``, or PAPO's when its loss terms are on."""
    if a.consumers is not None:
        return list(a.consumers)
    return ["papo"] if a.gamma > 0 or a.eta2 > 0 else []


@dataclass(frozen=True)
class ViewPlan:
    scored: tuple                 # views scored in the no-grad pass, in order
    in_update: Optional[str]      # the view whose rows ride in each update micro-batch, if any

    @property
    def generated(self) -> tuple:
        extra = (self.in_update,) if self.in_update and self.in_update not in self.scored else ()
        return self.scored + extra


def view_plan(a) -> ViewPlan:
    specs = [CONSUMERS.get(name) for name in active_consumers(a)]
    read = [s.view(a) for s in specs if s.scored(a)]
    update = [s.view(a) for s in specs if not s.scored(a)]
    listed = [v for v in (a.views or []) if v not in update or v in read]
    scored = tuple(dict.fromkeys(listed + read))
    return ViewPlan(scored, update[0] if update else None)


def check_views_and_consumers(a) -> None:
    """ValueError naming the field for an unknown view or consumer, or a consumer whose view is not configured."""
    for v in a.views or []:
        VIEWS.get(v)
    if a.vppo_view not in VIEWS:
        raise ValueError(f"algorithm.vppo_view: unknown view {a.vppo_view!r}; choose one of "
                         f"{', '.join(VIEWS.names())}")
    names = active_consumers(a)
    for name in names:
        spec = CONSUMERS.get(name)
        if a.views is not None and spec.view(a) not in a.views:
            raise ValueError(f"algorithm.consumers: {name} reads the view {spec.view(a)!r}, which algorithm.views "
                             f"{list(a.views)} does not list; add it to algorithm.views")
    if (a.gamma > 0 or a.eta2 > 0) and "papo" not in names:
        raise ValueError("algorithm.gamma/eta2 > 0 need the papo consumer; add papo to algorithm.consumers or set "
                         "algorithm.gamma=0 and algorithm.eta2=0")


def apply_consumers(a, tokens: dict, view_logp: dict, layout: StepLayout, response_mask: Tensor,
                    group=None) -> dict:
    """Run the scored consumers on ``tokens`` (``old_logp``, ``advantages`` [N, T]; updated in place with their
    tensors and the scaled advantages); returns the exact DP means of their metrics and the per-view signals."""
    inp = ConsumerInputs(tokens["old_logp"], view_logp, response_mask.bool(), layout, group)
    pairs = {}
    for name, logp in view_logp.items():
        pairs.update(view_signal_sums(name, inp.old_logp, logp, inp.response_mask))
    for name in active_consumers(a):
        spec = CONSUMERS.get(name)
        if not spec.scored(a):
            continue
        out = spec.fn(inp, a)
        for key, value in out.tokens.items():
            if key in tokens and key != "pg_mask":
                raise ValueError(f"algorithm.consumers: two consumers set {key}; keep only one of them")
            tokens[key] = tokens[key] * value if key in tokens else value
        if out.advantage_scale is not None:
            tokens["advantages"] = tokens["advantages"] * out.advantage_scale.to(tokens["advantages"])[:, None]
        pairs.update(out.metrics)
    return reduce_means(pairs, group)


from megatron_papo.algorithms.consumers import papo, vppo  # noqa: E402,F401  (registers the built-in consumers)
