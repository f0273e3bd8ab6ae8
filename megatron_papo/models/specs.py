"""Kept for compatibility (scripts written before the family folders): the layer specs now live in
``models.common.specs``."""

from megatron_papo.models.common.specs import (TRANSFORMER_IMPLS, check_transformer_impl,  # noqa: F401
                                               language_layer_spec, local_layer_spec, te_layer_spec,
                                               vision_layer_spec)
