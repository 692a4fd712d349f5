"""Recurrent-state cache layer for lightning layers. Placeholder until the lightning issue lands."""


def ensure_recurrent_cache_layers(cache, config) -> None:
    """Make every `linear_attention` layer of `cache` a recurrent-state layer (idempotent)."""
    if "linear_attention" in config.layer_types:
        raise NotImplementedError("attention type 'lightning' is not implemented yet")
