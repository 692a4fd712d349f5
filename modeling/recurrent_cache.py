"""Recurrent-state cache layer for lightning layers (transformers-v5.md §8).

transformers' stock `LinearAttentionLayer` is written for layers that also keep a convolution state: its token
counter, `has_previous_state`, `device` and `crop` are all driven by `update_conv_state`. Lightning keeps only a
recurrent state `[B, H, d, d]`, so with the stock layer the state would never be read back, `get_seq_length()` would
stay 0, beam reordering would fail and assisted decoding could not roll back. `DecoderOnlyLinearAttentionLayer` fixes
those points and keeps the layer type `linear_attention`, so masks, `DynamicCache(config)`, `StaticCache` and
`generate()` treat it as usual. `ensure_recurrent_cache_layers` swaps it into any cache at the top of the model's
forward; the global layer-type mapping of transformers is left alone (it would change every other model).
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer


class DecoderOnlyLinearAttentionLayer(LinearAttentionLayer):
    """`linear_attention` cache layer whose state is written only through `update_recurrent_state`."""

    def update_recurrent_state(
        self,
        recurrent_states: torch.Tensor | list[torch.Tensor],
        state_idx: int = 0,
        num_new_tokens: int = 0,
        **kwargs,
    ) -> torch.Tensor:
        """Store the new state and count `num_new_tokens`.

        `recurrent_states` is the final state, or, while recording (assisted decoding), the states after each of the
        forward's last tokens: the parent then records `[previous state] + recurrent_states[:-1]` as history, from
        which `crop(-r)` restores the state `r` tokens back.
        """
        if self.device is None:
            first = recurrent_states if isinstance(recurrent_states, torch.Tensor) else recurrent_states[0]
            self.device, self.dtype = first.device, first.dtype
            self.cumulative_length_linear = self.cumulative_length_linear.to(self.device)
        states = super().update_recurrent_state(recurrent_states, state_idx)
        self.has_previous_state[state_idx] = True
        if state_idx == 0:
            self.cumulative_length_linear.add_(num_new_tokens)
        return states

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the last `-tokens_to_remove` tokens (`tokens_to_remove <= 0`) from the recorded history, then
        drop the history. `crop(0)` only drops it."""
        if not self.record_past:
            raise RuntimeError(
                "`crop` was called on a lightning cache layer that does not record its past; call "
                "`cache.activate_past_recording(recurrent_states_to_keep=...)` before the forward to roll back."
            )
        if tokens_to_remove > 0:
            raise RuntimeError(
                "Lightning cache layers are cropped with a negative count: the number of tokens to remove, e.g. "
                f"`crop(-2)`; got {tokens_to_remove}."
            )
        tokens_to_remove = -tokens_to_remove
        initialized = [i for i in range(self.number_of_states) if self.is_recurrent_states_initialized[i]]
        for i in initialized:
            if tokens_to_remove > len(self.recurrent_states_history[i]):
                raise RuntimeError(
                    f"Cannot roll back {tokens_to_remove} tokens: only {len(self.recurrent_states_history[i])} "
                    "states were recorded (`recurrent_states_to_keep` is too small)."
                )
        for i in initialized:
            if tokens_to_remove > 0:
                self.recurrent_states[i].copy_(self.recurrent_states_history[i][-tokens_to_remove])
            self.recurrent_states_history[i] = []
        self.cumulative_length_linear.sub_(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row `repeats` times along the batch (beam search / sampling expansion)."""
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = self.recurrent_states[i].repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` of the batch."""
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = self.recurrent_states[i][indices, ...]


def _recurrent_layer_from(layer) -> DecoderOnlyLinearAttentionLayer:
    """The replacement for a stock `LinearAttentionLayer` or an unused lazy `DynamicLayer`."""
    new_layer = DecoderOnlyLinearAttentionLayer(number_of_states=getattr(layer, "number_of_states", 1))
    if isinstance(layer, LinearAttentionLayer):
        # The subclass adds no attributes: everything the stock layer holds (recording flags set by `generate`
        # before the first forward, states, counter) carries over unchanged.
        new_layer.__dict__.update(layer.__dict__)
    return new_layer


def ensure_recurrent_cache_layers(cache: Cache | None, config) -> None:
    """Make every `linear_attention` layer of `cache` a `DecoderOnlyLinearAttentionLayer` (idempotent).

    The model's forward calls this right after it creates or receives the cache. Stock `LinearAttentionLayer`s (from
    `DynamicCache(config)` / `StaticCache`) and not-yet-used lazy `DynamicLayer`s at lightning indices are swapped;
    missing layers (a bare `DynamicCache()`) are appended. A no-op without a cache or without lightning layers.
    """
    if cache is None or "linear_attention" not in config.layer_types:
        return
    for idx, layer_type in enumerate(config.layer_types):
        if idx == len(cache.layers):
            if layer_type == "linear_attention":
                cache.layers.append(DecoderOnlyLinearAttentionLayer())
            else:
                cache.layers.append((cache.layer_class_to_replicate or DynamicLayer)())
            continue
        layer = cache.layers[idx]
        if layer_type != "linear_attention" or isinstance(layer, DecoderOnlyLinearAttentionLayer):
            continue
        is_stock_linear = type(layer) is LinearAttentionLayer
        is_unused_lazy = type(layer) is DynamicLayer and not layer.is_initialized
        if not (is_stock_linear or is_unused_lazy):
            raise ValueError(
                f"Cache layer {idx} is a {type(layer).__name__}, but layer {idx} of this model is a lightning "
                "(`linear_attention`) layer; pass a cache built for this model, e.g. `DynamicCache(config=config)`."
            )
        cache.layers[idx] = _recurrent_layer_from(layer)


__all__ = ["DecoderOnlyLinearAttentionLayer", "ensure_recurrent_cache_layers"]
