"""DecoderOnly: a GQA + RoPE + SwiGLU + RMSNorm decoder with a per-layer choice of attention.

Structure follows transformers' `modeling_llama.py`. The decoder block never branches on the attention type: it asks
`ATTENTION_CLASSES` for the class of `config.attention_types[layer_idx]`, and each attention class owns its cache
semantics (key/value layers for `gqa` and `dual_chunk`, a recurrent-state layer for `lightning`).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .dual_chunk_attention import DecoderOnlyDualChunkAttention
from .gqa_attention import DecoderOnlyAttention
from .layers import DecoderOnlyMLP, DecoderOnlyRMSNorm, DecoderOnlyRotaryEmbedding
from .lightning_attention import DecoderOnlyLightningAttention
from .recurrent_cache import ensure_recurrent_cache_layers


try:  # flat checkpoint folder loaded with trust_remote_code
    from .configuration_decoder_only import DecoderOnlyConfig
except ImportError:  # the installed project
    from configuration.configuration_decoder_only import DecoderOnlyConfig


ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "gqa": DecoderOnlyAttention,
    "lightning": DecoderOnlyLightningAttention,
    "dual_chunk": DecoderOnlyDualChunkAttention,
}


@dataclass
class DecoderOnlyModelOutput(BaseModelOutputWithPast):
    r"""
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The final-normed hidden state at each row's last real token (the seed's output). Left or right padding gives
        the same vector as the unpadded row.
    """

    pooler_output: torch.FloatTensor | None = None


class DecoderOnlyDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `h + dropout(attn(RMSNorm(h)))`, then `h + dropout(SwiGLU(RMSNorm(h)))`."""

    def __init__(self, config: DecoderOnlyConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.attention_type = config.attention_types[layer_idx]
        self.self_attn = ATTENTION_CLASSES[self.attention_type](config=config, layer_idx=layer_idx)
        self.mlp = DecoderOnlyMLP(config)
        self.input_layernorm = DecoderOnlyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DecoderOnlyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + self.dropout(hidden_states)

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + self.dropout(hidden_states)


class DecoderOnlyPreTrainedModel(PreTrainedModel):
    config: DecoderOnlyConfig
    config_class = DecoderOnlyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderOnlyDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Python loops over lightning blocks / dual chunks and the hybrid cache break full graphs.
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "hidden_states": DecoderOnlyDecoderLayer,
        # A list (one recorder per class), the format transformers accepts; a tuple is not a valid recorder.
        "attentions": [DecoderOnlyAttention, DecoderOnlyDualChunkAttention],
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Buffers computed in __init__ (lightning decay tables) must be re-set, or from_pretrained leaves them empty.
        if hasattr(module, "init_buffers"):
            for name, value in module.init_buffers().items():
                init.copy_(getattr(module, name), value)


class DecoderOnlyModel(DecoderOnlyPreTrainedModel):
    """The decoder stack: `input_ids` or `inputs_embeds [b, s, embed_dim]` in; `last_hidden_state [b, s, hidden]`
    and `pooler_output [b, hidden]` (the last real token's state) out."""

    def __init__(self, config: DecoderOnlyConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim, self.padding_idx)
        # The seed projects features to hidden_size only when the widths differ; no module otherwise.
        if config.embed_dim != config.hidden_size:
            self.input_proj = nn.Linear(config.embed_dim, config.hidden_size, bias=True)
        else:
            self.input_proj = None
        self.layers = nn.ModuleList(
            [DecoderOnlyDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        if config.final_norm == "layernorm":
            self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.norm = DecoderOnlyRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DecoderOnlyRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    # `cache_params` is the old name of transformers' linear-attention (Mamba-style) caches: accepted with a warning.
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DecoderOnlyModelOutput:
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = self.input_proj(inputs_embeds) if self.input_proj is not None else inputs_embeds

        # No default cache in training: it is never reused there, and its presence would disable transformers'
        # packed-sequence (padding-free) mask detection.
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            ensure_recurrent_cache_layers(cache, self.config)

        if position_ids is None:
            position_ids = default_position_ids(hidden_states, attention_mask, cache)

        padding_mask = (
            attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        )
        if not isinstance(attention_mask, dict):  # generate() may pass the per-kind masks already built
            attention_mask = self._layer_masks(hidden_states, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for layer_type, decoder_layer in zip(self.config.layer_types, self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=attention_mask[layer_type],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return DecoderOnlyModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            pooler_output=pool_last_real_token(hidden_states, padding_mask),
        )

    def _layer_masks(self, hidden_states, attention_mask, cache, position_ids) -> dict[str, torch.Tensor | None]:
        """One mask per cache-layer kind: causal(+padding, +packing) for softmax layers, 2-D padding for linear."""
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": hidden_states,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        masks = {}
        if "full_attention" in self.config.layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if "linear_attention" in self.config.layer_types:
            masks["linear_attention"] = create_recurrent_attention_mask(**mask_kwargs)
        return masks

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids) -> None:
        """Input errors name the argument, the value and the rule (raised before any computation)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "DecoderOnlyModel: pass exactly one of `input_ids` or `inputs_embeds` "
                f"(got input_ids={'set' if input_ids is not None else None}, "
                f"inputs_embeds={'set' if inputs_embeds is not None else None})."
            )
        if input_ids is not None:
            if input_ids.is_floating_point():
                raise TypeError(
                    f"`input_ids` must be integer token ids, got {input_ids.dtype}; pass continuous feature vectors "
                    "[batch, seq, embed_dim] as `inputs_embeds=`."
                )
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must be [batch, seq], got shape {tuple(input_ids.shape)}.")
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
                raise ValueError(
                    f"`input_ids` must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                    f"[{int(input_ids.min())}, {int(input_ids.max())}]."
                )
            batch, seq = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.embed_dim:
                raise ValueError(
                    f"`inputs_embeds` must be [batch, seq, embed_dim={self.config.embed_dim}], got shape "
                    f"{tuple(inputs_embeds.shape)}."
                )
            batch, seq = inputs_embeds.shape[:2]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
                raise ValueError(
                    f"`attention_mask` must be [batch={batch}, past + seq >= {seq}], got shape "
                    f"{tuple(attention_mask.shape)}."
                )
            empty = ~attention_mask.bool().any(dim=-1)
            if empty.any():
                raise ValueError(
                    f"`attention_mask` rows {empty.nonzero().flatten().tolist()} contain no real token (all zeros)."
                )
        if position_ids is not None and position_ids.shape[-1] != seq:
            raise ValueError(
                f"`position_ids` must have {seq} positions per row, got shape {tuple(position_ids.shape)}."
            )


def default_position_ids(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
) -> torch.LongTensor:
    """Positions when none are given: from a 2-D mask (0 at each row's first real token, as `generate()` does), else
    `arange(seq) + tokens already cached`."""
    seq = hidden_states.shape[1]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -seq:]
    past = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(seq, device=hidden_states.device) + past).unsqueeze(0)


def pool_last_real_token(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`hidden_states[b, t_b]` with `t_b` the last position whose (current-window) mask is 1; `seq - 1` without one."""
    seq = hidden_states.shape[1]
    if attention_mask is None:
        return hidden_states[:, -1]
    current = attention_mask[:, -seq:].bool()
    last = seq - 1 - current.flip(-1).int().argmax(-1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


class DecoderOnlyForCausalLM(DecoderOnlyPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DecoderOnlyConfig) -> None:
        super().__init__(config)
        self.model = DecoderOnlyModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_llama(cls, source, **config_overrides) -> "DecoderOnlyForCausalLM":
        """An equivalent DecoderOnly model from a transformers `LlamaForCausalLM` / `Qwen2ForCausalLM` (an instance
        or a saved folder): RMSNorm final norm, the source's biases, no input projection, eval mode. Overrides are
        DecoderOnlyConfig fields applied afterwards, e.g. `attention_type="dual_chunk", chunk_size=..., local_size=...`.
        """
        from .convert import convert_llama  # noqa: PLC0415  (conversion needs transformers' Auto classes)

        return convert_llama(cls, source, **config_overrides)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    # `cache_params` is the old name of transformers' linear-attention (Mamba-style) caches: accepted with a warning.
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: DecoderOnlyModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class DecoderOnlyForSequenceClassification(DecoderOnlyPreTrainedModel):
    """A linear `score` head on `pooler_output` (the last real token, mask-aware, as the seed's output)."""

    # The loss is a per-batch mean for every problem type (regression and multi-label losses cannot use
    # `num_items_in_batch`), so the Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: DecoderOnlyConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DecoderOnlyModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    # `cache_params` is the old name of transformers' linear-attention (Mamba-style) caches: accepted with a warning.
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs: DecoderOnlyModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.pooler_output)
        loss = None
        if labels is not None:
            # **kwargs carries the Trainer's num_items_in_batch: single-label cross-entropy then sums / counts over the
            # whole accumulated (and all-reduced) batch, as the Trainer assumes for a forward that takes **kwargs.
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "ATTENTION_CLASSES",
    "DecoderOnlyForCausalLM",
    "DecoderOnlyForSequenceClassification",
    "DecoderOnlyModel",
    "DecoderOnlyModelOutput",
    "DecoderOnlyPreTrainedModel",
]
