"""The seed's API: `DecoderOnly.build(embed_dim=287, ...)` and `DecoderOnly.output_size(...)`.

Edifice's `DecoderOnly.build/1` turns a `[batch, seq, embed_dim]` feature sequence into the last position's
`[batch, hidden_size]` state. Here `build` returns a `DecoderOnlyModel`; call it with `inputs_embeds=` and read
`pooler_output` (mask-aware last real token), or use `last_hidden_state` for every position.
"""

from configuration import DecoderOnlyConfig

from .modeling_decoder_only import DecoderOnlyModel


class DecoderOnly:
    """Seed-style constructors with the seed's option names and defaults."""

    @staticmethod
    def build(
        embed_dim: int,
        hidden_size: int = 256,
        num_heads: int = 8,
        num_kv_heads: int = 2,
        num_layers: int = 4,
        attention_type: str = "gqa",
        block_size: int = 64,
        chunk_size: int = 64,
        use_rope: bool = True,
        interleave_rope: bool = False,
        yarn: bool = False,
        yarn_scale: float = 8,
        yarn_original_max_position: int = 2048,
        dropout: float = 0.1,
        window_size: int = 60,
        **config_kwargs,
    ) -> DecoderOnlyModel:
        """A randomly initialised model; any other DecoderOnlyConfig field may be passed as a keyword."""
        config = DecoderOnlyConfig(
            embed_dim=embed_dim,
            hidden_size=hidden_size,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            num_hidden_layers=num_layers,
            attention_type=attention_type,
            block_size=block_size,
            chunk_size=chunk_size,
            use_rope=use_rope,
            interleave_rope=interleave_rope,
            yarn=yarn,
            yarn_scale=yarn_scale,
            yarn_original_max_position=yarn_original_max_position,
            dropout=dropout,
            window_size=window_size,
            **config_kwargs,
        )
        return DecoderOnlyModel(config)

    @staticmethod
    def output_size(hidden_size: int = 256, **_options) -> int:
        """Width of the model's output vector: `hidden_size` (other options do not change it)."""
        return hidden_size
