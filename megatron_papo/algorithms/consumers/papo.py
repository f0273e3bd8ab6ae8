"""PAPO's consumer: the masked view's log-probs feed the Implicit Perception Loss and the Double Entropy Loss.

The loss terms themselves live in the ``papo`` policy loss (``algorithms.policy_loss``): ``- gamma k3(logp,
mask_logp) + eta2 (-mask_logp)``, with ``logp`` the current policy's. By default the masked log-probs come once per
RL step from the no-grad pass (stop-gradient target); with ``algorithm.perception_grad`` or
``algorithm.exact_perception_kl`` the masked rows ride in every update micro-batch instead (they need the current
weights' logits), so the view is not scored and this function is not called.
"""

from __future__ import annotations

from megatron_papo.algorithms.consumers import ConsumerInputs, ConsumerOutput, register_consumer


def _scored(a) -> bool:
    return not (a.perception_grad or a.exact_perception_kl)


@register_consumer("papo", view=lambda a: "masked", scored=_scored)
def papo_consumer(inp: ConsumerInputs, cfg) -> ConsumerOutput:
    """``mask_logp`` [N, T] for the policy loss: the old weights' log-probs with the masked images."""
    return ConsumerOutput(tokens={"mask_logp": inp.views["masked"]})
