"""Log-prob, entropy and KL on vocab-parallel (tensor-parallel sharded) logits, without gathering the vocabulary.

``logits`` is this rank's contiguous vocabulary shard ``[..., V/tp]``; ``targets`` are global token ids ``[...]``;
``group`` is the tensor-parallel group (None: megatron's current one, or TP=1 when nothing is initialised).
Results ``[...]`` are float32, identical on every rank; each rank gets the gradient of one loss.
"""

from megatron_papo.ops.vocab_parallel import (
    PairStats,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
    vocab_parallel_pair_stats,
    vocab_parallel_token_stats,
)

__all__ = [
    "PairStats", "vocab_parallel_entropy", "vocab_parallel_kl", "vocab_parallel_log_probs",
    "vocab_parallel_pair_stats", "vocab_parallel_token_stats",
]
