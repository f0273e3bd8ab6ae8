"""megatron_papo: PAPO (perception-aware RL) for vision-language models on megatron-core."""

__version__ = "0.1.0"
