"""DecoderOnlyConfig: the spec's defaults, seed aliases, per-layer layout, YaRN mapping, validation, round trips."""

import json

import pytest

from configuration import DecoderOnlyConfig, default_intermediate_size, hybrid_attention_types


def test_spec_defaults():
    config = DecoderOnlyConfig()
    expected = {
        "hidden_size": 256,
        "embed_dim": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "head_dim": 32,
        "intermediate_size": 688,
        "attention_type": "gqa",
        "block_size": 64,
        "chunk_size": 64,
        "local_size": 8,
        "use_rope": True,
        "interleave_rope": False,
        "yarn": False,
        "yarn_scale": 8,
        "yarn_original_max_position": 2048,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "window_size": 60,
        "rms_norm_eps": 1e-6,
        "layer_norm_eps": 1e-5,
        "final_norm": "layernorm",
        "attention_bias": False,
        "attention_output_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
    }
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.attention_types == ["gqa"] * 4
    assert config.layer_types == ["full_attention"] * 4
    assert config.rope_layers == [True] * 4


def test_seed_names_are_the_same_attributes():
    config = DecoderOnlyConfig(num_heads=4, num_kv_heads=1, num_layers=3, hidden_size=64)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (4, 1, 3)
    assert (config.num_heads, config.num_kv_heads, config.num_layers) == (4, 1, 3)
    assert config.head_dim == 16 and len(config.attention_types) == 3
    config.num_heads = 8
    assert config.num_attention_heads == 8


@pytest.mark.parametrize(
    "hidden, intermediate",
    [
        (16, 48),
        (32, 88),
        (48, 128),
        (64, 176),
        (128, 344),
        (256, 688),
        (512, 1368),
        (768, 2048),
        (1024, 2736),
        (2048, 5464),
        (4096, 10928),
    ],
)
def test_intermediate_size_table(hidden, intermediate):
    assert default_intermediate_size(hidden) == intermediate  # seed-spec §6.2 table


def test_explicit_intermediate_size_wins():
    assert DecoderOnlyConfig(intermediate_size=100).intermediate_size == 100


def test_interleave_rope_even_layers():
    assert DecoderOnlyConfig(num_layers=4, interleave_rope=True).rope_layers == [True, False, True, False]
    assert DecoderOnlyConfig(num_layers=1, interleave_rope=True).rope_layers == [True]
    assert DecoderOnlyConfig(num_layers=3, use_rope=False).rope_layers == [False] * 3
    explicit = DecoderOnlyConfig(num_layers=3, rope_layers=[False, True, True], interleave_rope=True)
    assert explicit.rope_layers == [False, True, True]


def test_yarn_sets_rope_parameters_and_context():
    config = DecoderOnlyConfig(yarn=True, yarn_scale=4, yarn_original_max_position=1024)
    assert config.rope_parameters == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    assert config.max_position_embeddings == 4096
    assert DecoderOnlyConfig(yarn=True, max_position_embeddings=3000).max_position_embeddings == 3000


def test_legacy_rope_theta_keyword():
    assert DecoderOnlyConfig(rope_theta=500000.0).rope_parameters["rope_theta"] == 500000.0


def test_attention_layout_and_layer_types():
    config = DecoderOnlyConfig(num_layers=3, attention_types=["lightning", "gqa", "dual_chunk"])
    assert config.layer_types == ["linear_attention", "full_attention", "full_attention"]
    assert DecoderOnlyConfig(attention_type="lightning", num_layers=2).layer_types == ["linear_attention"] * 2
    assert hybrid_attention_types(8) == ["lightning"] * 7 + ["gqa"]
    assert hybrid_attention_types(4, softmax_every=2) == ["lightning", "gqa", "lightning", "gqa"]


def test_dual_chunk_config_dict_maps_onto_fields():
    config = DecoderOnlyConfig(
        dual_chunk_attention_config={"chunk_size": 32, "local_size": 4, "original_max_position_embeddings": 64}
    )
    assert (config.chunk_size, config.local_size) == (32, 4)
    assert config.dual_chunk_attention_config["original_max_position_embeddings"] == 64
    assert DecoderOnlyConfig(chunk_size=48).dual_chunk_attention_config == {
        "chunk_size": 48,
        "local_size": 6,
        "original_max_position_embeddings": None,
    }


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_layers": 0}, "num_hidden_layers"),
        ({"num_heads": 0}, "num_attention_heads"),
        ({"num_kv_heads": 0}, "num_key_value_heads"),
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size"),
        ({"num_heads": 8, "num_kv_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 24, "num_heads": 8}, "head_dim"),
        ({"head_dim": 7}, "head_dim"),
        ({"attention_type": "mamba"}, "attention_type"),
        ({"attention_types": ["gqa", "linear"], "num_layers": 2}, "attention_types[1]"),
        ({"attention_types": ["gqa"], "num_layers": 2}, "attention_types"),
        ({"rope_layers": [True], "num_layers": 2}, "rope_layers"),
        ({"layer_types": ["linear_attention"] * 4}, "layer_types"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"attention_dropout": 1.5}, "attention_dropout"),
        ({"yarn_scale": 0.5}, "yarn_scale"),
        ({"yarn_original_max_position": 0}, "yarn_original_max_position"),
        ({"block_size": 0}, "block_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 8, "local_size": 8}, "local_size"),
        ({"local_size": -1}, "local_size"),
        ({"dual_chunk_attention_config": {"sparse_attention_config": {}}}, "dual_chunk_attention_config"),
        ({"dual_chunk_attention_config": {"foo": 1}}, "dual_chunk_attention_config"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"window_size": 0}, "window_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"final_norm": "batchnorm"}, "final_norm"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"embed_dim": 12, "tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"`{__import__('re').escape(field)}`=.*is invalid"):
        DecoderOnlyConfig(**kwargs)


def test_yarn_with_dual_chunk_warns():
    with pytest.warns(UserWarning, match="dual_chunk layers use plain RoPE"):
        DecoderOnlyConfig(yarn=True, attention_type="dual_chunk")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"embed_dim": 287, "yarn": True, "interleave_rope": True, "num_layers": 3},
        {"attention_types": ["lightning", "gqa"], "num_layers": 2, "block_size": 16},
        {"attention_type": "dual_chunk", "dual_chunk_attention_config": {"original_max_position_embeddings": 32}},
    ],
)
def test_json_round_trip_is_idempotent(tmp_path, kwargs):
    config = DecoderOnlyConfig(**kwargs)
    config.save_pretrained(tmp_path)
    reloaded = DecoderOnlyConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "decoder_only"
    # Loading the saved dict again (seed options and derived fields both present) changes nothing.
    assert DecoderOnlyConfig(**{k: v for k, v in saved.items() if k != "model_type"}).to_dict() == config.to_dict()
