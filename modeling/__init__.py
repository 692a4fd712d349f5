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
from .hub import enable_hub_export
from .seed import DecoderOnly


AutoConfig.register(DecoderOnlyConfig.model_type, DecoderOnlyConfig, exist_ok=True)
AutoModel.register(DecoderOnlyConfig, DecoderOnlyModel, exist_ok=True)
AutoModelForCausalLM.register(DecoderOnlyConfig, DecoderOnlyForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DecoderOnlyConfig, DecoderOnlyForSequenceClassification, exist_ok=True)
# save_pretrained / push_to_hub of every DecoderOnly model write the Hub-ready folder (code, full auto_map, README).
enable_hub_export(DecoderOnlyPreTrainedModel)

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
