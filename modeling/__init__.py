"""DecoderOnly modeling. Importing this package registers the model with transformers' Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from configuration import DecoderOnlyConfig

from .modeling_decoder_only import (
    ATTENTION_CLASSES,
    DecoderOnlyForCausalLM,
    DecoderOnlyForSequenceClassification,
    DecoderOnlyModel,
    DecoderOnlyModelOutput,
    DecoderOnlyPreTrainedModel,
)
from .seed import DecoderOnly


AutoConfig.register(DecoderOnlyConfig.model_type, DecoderOnlyConfig, exist_ok=True)
AutoModel.register(DecoderOnlyConfig, DecoderOnlyModel, exist_ok=True)
AutoModelForCausalLM.register(DecoderOnlyConfig, DecoderOnlyForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DecoderOnlyConfig, DecoderOnlyForSequenceClassification, exist_ok=True)

__all__ = [
    "ATTENTION_CLASSES",
    "DecoderOnly",
    "DecoderOnlyConfig",
    "DecoderOnlyForCausalLM",
    "DecoderOnlyForSequenceClassification",
    "DecoderOnlyModel",
    "DecoderOnlyModelOutput",
    "DecoderOnlyPreTrainedModel",
]
