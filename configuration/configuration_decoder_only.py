"""DecoderOnly model configuration.

Every option of the seed (Edifice ``DecoderOnly.build/1``) keeps its seed name and default; standard concepts use the
transformers field names, and the seed names ``num_heads``, ``num_kv_heads`` and ``num_layers`` are aliases of
``num_attention_heads``, ``num_key_value_heads`` and ``num_hidden_layers`` (one attribute, two names).

This file is also copied, unchanged, into every exported checkpoint (``trust_remote_code``), so it imports nothing
from this project.
"""

import math
import warnings

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


ATTENTION_TYPES = ("gqa", "lightning", "dual_chunk")
# transformers' cache/mask layer kind of each attention type.
ATTENTION_TYPE_TO_LAYER_TYPE = {
    "gqa": "full_attention",
    "lightning": "linear_attention",
    "dual_chunk": "full_attention",
}
FINAL_NORMS = ("layernorm", "rmsnorm")
SWIGLU_EXPANSION = 2.667


def default_intermediate_size(hidden_size: int) -> int:
    """The seed's SwiGLU width: ``hidden_size * 2.667`` rounded half up, then up to a multiple of 8."""
    raw = math.floor(hidden_size * SWIGLU_EXPANSION + 0.5)
    return raw + (-raw) % 8


def hybrid_attention_types(num_layers: int, softmax_every: int = 8, softmax_type: str = "gqa") -> list[str]:
    """A MiniMax-01 style layout: every ``softmax_every``-th layer is softmax attention, the rest are lightning.

    ``hybrid_attention_types(8)`` gives seven ``"lightning"`` layers then one ``"gqa"`` layer.
    """
    if softmax_every < 1:
        raise ValueError(f"softmax_every must be >= 1, got {softmax_every}")
    return [softmax_type if (i + 1) % softmax_every == 0 else "lightning" for i in range(num_layers)]


def _fail(field: str, value, rule: str) -> None:
    raise ValueError(f"DecoderOnlyConfig: `{field}`={value!r} is invalid: {rule}.")


@strict(accept_kwargs=True)
class DecoderOnlyConfig(PreTrainedConfig):
    r"""Configuration of a DecoderOnly model (GQA + RoPE + SwiGLU + RMSNorm decoder with per-layer attention types).

    Seed options (names and defaults of the seed specification):
        embed_dim (`int`, *optional*): width of the input feature vectors. `None` means `hidden_size`; a different
            value adds a `Linear(embed_dim -> hidden_size)` input projection (`input_proj`).
        hidden_size (`int`, defaults to 256), num_heads / `num_attention_heads` (8),
        num_kv_heads / `num_key_value_heads` (2): key/value heads of softmax (`gqa`) and `dual_chunk` layers.
            Lightning layers always use `num_attention_heads` heads for q, k and v (as MiniMax-01 does).
        num_layers / `num_hidden_layers` (4).
        attention_type (`str`, defaults to `"gqa"`): `"gqa"`, `"lightning"` or `"dual_chunk"`; fills
            `attention_types` when that is not given.
        block_size (`int`, defaults to 64): Lightning block length; a speed knob only, outputs do not depend on it.
        chunk_size (`int`, defaults to 64): Dual Chunk Attention's largest relative distance.
        use_rope (`bool`, defaults to True), interleave_rope (`bool`, defaults to False): softmax layers only; iRoPE
            puts RoPE on even (0-based) layers and no positions (NoPE) on odd layers.
        yarn (`bool`, defaults to False), yarn_scale (8), yarn_original_max_position (2048): standard YaRN on the
            layers that use RoPE (sets `rope_parameters`).
        dropout (`float`, defaults to 0.1): residual dropout on each sublayer output.
        window_size (`int`, defaults to 60): expected sequence length; a hint, it changes no computation.

    Per-layer layout:
        attention_types (`list[str]`, *optional*): one entry per layer; mix `"lightning"` with `"gqa"` for a hybrid
            linear/softmax model (see `hybrid_attention_types`). `layer_types` (transformers' cache/mask kinds) is
            derived from it: `"full_attention"` for gqa and dual_chunk, `"linear_attention"` for lightning.
        rope_layers (`list[bool]`, *optional*): per-layer RoPE (True) / NoPE (False) for softmax layers; filled from
            `use_rope` / `interleave_rope` when not given.

    Dual Chunk Attention:
        local_size (`int`, *optional*): exact window into the previous chunk; defaults to `chunk_size // 8`.
        dual_chunk_attention_config (`dict`, *optional*): Qwen2.5-1M style `{"chunk_size", "local_size",
            "original_max_position_embeddings"}`; given keys override `chunk_size` / `local_size`, and it is always
            stored complete. `original_max_position_embeddings` turns on Qwen's attention temperature past that
            length (off when `None`). Sparse-attention keys are rejected.

    Standard transformers fields: vocab_size, intermediate_size (seed formula when `None`), head_dim, hidden_act,
    rms_norm_eps (1e-6), layer_norm_eps (1e-5, final LayerNorm), final_norm (`"layernorm"` | `"rmsnorm"`),
    max_position_embeddings (2048, or `yarn_original_max_position * yarn_scale` with YaRN; not a length limit),
    rope_parameters (`rope_theta` 10000), attention_bias (q/k/v/o of softmax and dual_chunk layers),
    attention_output_bias (o_proj only; defaults to attention_bias, False for Qwen2's pattern), mlp_bias,
    attention_dropout (0), initializer_range, tie_word_embeddings, pad/bos/eos token ids, use_cache.
    """

    model_type = "decoder_only"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",
        "num_layers": "num_hidden_layers",
    }
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    embed_dim: int | None = None
    hidden_size: int = 256
    intermediate_size: int | None = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    attention_type: str = "gqa"
    attention_types: list[str] | None = None
    layer_types: list[str] | None = None
    use_rope: bool = True
    interleave_rope: bool = False
    rope_layers: list[bool] | None = None
    yarn: bool = False
    yarn_scale: int | float = 8.0
    yarn_original_max_position: int = 2048
    rope_parameters: RopeParameters | dict | None = None
    max_position_embeddings: int | None = None
    block_size: int = 64
    chunk_size: int = 64
    local_size: int | None = None
    dual_chunk_attention_config: dict | None = None
    dropout: int | float = 0.1
    attention_dropout: int | float = 0.0
    window_size: int = 60
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    final_norm: str = "layernorm"
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    mlp_bias: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        # Seed aliases passed as keywords must be applied before anything is derived from them.
        for alias, field in self.attribute_map.items():
            if alias in kwargs:
                setattr(self, field, kwargs.pop(alias))
        self._validate_sizes()
        if self.embed_dim is None:
            self.embed_dim = self.hidden_size
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        self._derive_attention_layout()
        self._derive_rope(kwargs)
        self._derive_dual_chunk()
        if self.max_position_embeddings is None:
            self.max_position_embeddings = int(self.yarn_original_max_position * self.yarn_scale) if self.yarn else 2048
        super().__post_init__(**kwargs)

    # ----------------------------------------------------------------------------------------------- derivations
    def _derive_attention_layout(self) -> None:
        if self.attention_type not in ATTENTION_TYPES:
            _fail("attention_type", self.attention_type, f"must be one of {ATTENTION_TYPES}")
        if self.attention_types is None:
            self.attention_types = [self.attention_type] * self.num_hidden_layers
        self.attention_types = list(self.attention_types)
        self._check_per_layer("attention_types", self.attention_types)
        for i, kind in enumerate(self.attention_types):
            if kind not in ATTENTION_TYPES:
                _fail(f"attention_types[{i}]", kind, f"must be one of {ATTENTION_TYPES}")
        derived = [ATTENTION_TYPE_TO_LAYER_TYPE[kind] for kind in self.attention_types]
        if self.layer_types is not None and list(self.layer_types) != derived:
            _fail("layer_types", self.layer_types, f"is derived from attention_types and must equal {derived}")
        self.layer_types = derived
        if self.rope_layers is None:
            if self.interleave_rope:
                self.rope_layers = [i % 2 == 0 for i in range(self.num_hidden_layers)]
            else:
                self.rope_layers = [bool(self.use_rope)] * self.num_hidden_layers
        self.rope_layers = [bool(flag) for flag in self.rope_layers]
        self._check_per_layer("rope_layers", self.rope_layers)

    def _derive_rope(self, kwargs: dict) -> None:
        if self.yarn_scale < 1:
            _fail("yarn_scale", self.yarn_scale, "must be >= 1 (1 is plain RoPE)")
        if self.yarn_original_max_position < 1:
            _fail("yarn_original_max_position", self.yarn_original_max_position, "must be >= 1")
        rope_parameters = dict(self.rope_parameters or {})
        if "rope_theta" in kwargs:  # legacy top-level field
            rope_parameters.setdefault("rope_theta", kwargs.pop("rope_theta"))
        rope_parameters.setdefault("rope_theta", 10000.0)
        if self.yarn:
            rope_parameters.update(
                rope_type="yarn",
                factor=float(self.yarn_scale),
                original_max_position_embeddings=self.yarn_original_max_position,
            )
        else:
            rope_parameters.setdefault("rope_type", "default")
        self.rope_parameters = rope_parameters
        if self.yarn and "dual_chunk" in self.attention_types:
            warnings.warn(
                "DecoderOnlyConfig: yarn=True applies only to gqa layers; dual_chunk layers use plain RoPE "
                "frequencies and their own temperature "
                "(dual_chunk_attention_config['original_max_position_embeddings'])."
            )

    def _derive_dual_chunk(self) -> None:
        dca = dict(self.dual_chunk_attention_config or {})
        unsupported = sorted(set(dca) - {"chunk_size", "local_size", "original_max_position_embeddings"})
        sparse = [key for key in unsupported if "sparse" in key]
        if sparse:
            _fail("dual_chunk_attention_config", {k: dca[k] for k in sparse}, "sparse attention is not supported")
        if unsupported:
            _fail(
                "dual_chunk_attention_config",
                unsupported,
                "only chunk_size, local_size and original_max_position_embeddings are supported",
            )
        self.chunk_size = dca.get("chunk_size", self.chunk_size)
        self.local_size = dca.get("local_size", self.local_size)
        if self.chunk_size < 1:
            _fail("chunk_size", self.chunk_size, "must be >= 1")
        if self.local_size is None:
            self.local_size = self.chunk_size // 8
        if not 0 <= self.local_size < self.chunk_size:
            _fail("local_size", self.local_size, f"must satisfy 0 <= local_size < chunk_size ({self.chunk_size})")
        original = dca.get("original_max_position_embeddings")
        if original is not None and original < 1:
            _fail("dual_chunk_attention_config.original_max_position_embeddings", original, "must be >= 1 or None")
        self.dual_chunk_attention_config = {
            "chunk_size": self.chunk_size,
            "local_size": self.local_size,
            "original_max_position_embeddings": original,
        }

    # ------------------------------------------------------------------------------------------------ validation
    def _check_per_layer(self, field: str, values: list) -> None:
        if len(values) != self.num_hidden_layers:
            _fail(field, values, f"needs one entry per layer (num_hidden_layers={self.num_hidden_layers})")

    def _validate_sizes(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, field) < 1:
                _fail(field, getattr(self, field), "must be >= 1")
        for field in ("embed_dim", "intermediate_size", "head_dim"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                _fail(field, getattr(self, field), "must be >= 1 or None")
        for field in ("block_size", "window_size", "max_position_embeddings"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                _fail(field, getattr(self, field), "must be >= 1")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            _fail(
                "hidden_size",
                self.hidden_size,
                f"must be divisible by num_attention_heads ({self.num_attention_heads})",
            )
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if head_dim % 2:
            _fail("head_dim", head_dim, "must be even (RoPE rotates pairs (i, i + head_dim/2))")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"must divide num_attention_heads ({self.num_attention_heads})",
            )
        for field in ("dropout", "attention_dropout"):
            if not 0 <= getattr(self, field) < 1:
                _fail(field, getattr(self, field), "must be in [0, 1)")
        for field in ("rms_norm_eps", "layer_norm_eps"):
            if getattr(self, field) <= 0:
                _fail(field, getattr(self, field), "must be > 0")
        if self.final_norm not in FINAL_NORMS:
            _fail("final_norm", self.final_norm, f"must be one of {FINAL_NORMS}")
        if self.hidden_act != "silu":
            _fail("hidden_act", self.hidden_act, "must be 'silu' (SwiGLU)")
        if self.tie_word_embeddings and self.embed_dim not in (None, self.hidden_size):
            _fail(
                "tie_word_embeddings",
                True,
                f"needs embed_dim == hidden_size (got embed_dim={self.embed_dim}, hidden_size={self.hidden_size})",
            )

    def validate_architecture(self):
        """`@strict` hook. The base class compares `head_dim * num_heads` with `embed_dim`, which is a different
        quantity here (the input feature width), so the rules live in `_validate_sizes` instead."""


__all__ = ["DecoderOnlyConfig", "default_intermediate_size", "hybrid_attention_types"]
