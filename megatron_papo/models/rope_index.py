"""Kept for compatibility (scripts written before the family folders): now ``models.common.rope_index``."""

from megatron_papo.models.common.rope_index import get_packed_rope_index, get_rope_index  # noqa: F401
