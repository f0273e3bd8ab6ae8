"""megatron_papo: PAPO (perception-aware RL) for vision-language models on megatron-core."""

from megatron_papo import _startup

__version__ = "0.1.0"

# before any megatron-core module is imported: its accelerator-fallback warnings become one line
# (megatron_papo.platform.accelerators)
_startup.install()
