"""What every model family shares: the VLM composition (``vlm.VLMBase``), layer specs (``specs``), TransformerConfig
builders (``configs``), the spec base classes and Hugging Face config readers (``spec``), the M-RoPE index
(``rope_index``), the vision towers' skeleton, rotary and merger (``vision``), vision FLOP counting
(``counts``), the language-model entries of the HF name maps (``mapping``) and running a model built with
sequence parallelism without it (``sequence_parallel``). A family folder (``qwen2_5_vl/``, ``qwen3_vl/``)
subclasses these with only its differences."""
