"""DecoderOnly configuration: `DecoderOnlyConfig` (model_type ``"decoder_only"``)."""

from .configuration_decoder_only import DecoderOnlyConfig, default_intermediate_size, hybrid_attention_types


__all__ = ["DecoderOnlyConfig", "default_intermediate_size", "hybrid_attention_types"]
