"""Model behaviour: the seed API, data flow, pooling, save/load through the Auto classes, input errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import randomize_, tiny_config
from modeling import (
    DecoderOnly,
    DecoderOnlyConfig,
    DecoderOnlyForCausalLM,
    DecoderOnlyForSequenceClassification,
    DecoderOnlyModel,
)


def test_seed_build_shapes_and_defaults():
    model = DecoderOnly.build(embed_dim=287, hidden_size=256, num_heads=8, num_kv_heads=2, num_layers=6).eval()
    config = model.config
    assert (config.embed_dim, config.hidden_size, config.num_heads, config.num_kv_heads, config.num_layers) == (
        287,
        256,
        8,
        2,
        6,
    )
    assert (config.dropout, config.window_size, config.block_size, config.chunk_size) == (0.1, 60, 64, 64)
    features = torch.randn(3, 60, 287)
    with torch.no_grad():
        out = model(inputs_embeds=features)
    assert out.pooler_output.shape == (3, 256)
    assert out.last_hidden_state.shape == (3, 60, 256)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, -1])
    assert DecoderOnly.output_size(hidden_size=256) == 256
    assert DecoderOnly.output_size(hidden_size=64, num_layers=2) == 64
    default = DecoderOnly.build(embed_dim=16)
    assert (default.config.hidden_size, default.config.num_layers, default.config.attention_type) == (256, 4, "gqa")


def test_input_projection_only_when_widths_differ():
    assert DecoderOnlyModel(tiny_config()).input_proj is None
    model = DecoderOnlyModel(tiny_config(embed_dim=12))
    assert model.input_proj.in_features == 12 and model.input_proj.bias is not None
    assert model.embed_tokens.embedding_dim == 12
    assert "input_proj.weight" not in DecoderOnlyModel(tiny_config()).state_dict()


def test_final_norm_choice():
    assert isinstance(DecoderOnlyModel(tiny_config()).norm, torch.nn.LayerNorm)
    rms = DecoderOnlyModel(tiny_config(final_norm="rmsnorm")).norm
    assert type(rms).__name__ == "DecoderOnlyRMSNorm"


def test_data_flow_matches_a_manual_forward():
    """The spec's data flow (input_proj -> pre-norm blocks -> final LayerNorm) recomputed from the modules."""
    model = randomize_(DecoderOnlyModel(tiny_config(embed_dim=12, attn_implementation="eager"))).eval()
    x = torch.randn(2, 6, 12)
    with torch.no_grad():
        h = model.input_proj(x)
        positions = torch.arange(6).unsqueeze(0)
        cos_sin = model.rotary_emb(h, positions)
        causal = torch.full((6, 6), torch.finfo(h.dtype).min).triu(1)[None, None]
        for layer in model.layers:
            h = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=causal)[0]
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        expected = torch.nn.functional.layer_norm(h, (32,), model.norm.weight, model.norm.bias, eps=1e-5)
        actual = model(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_residual_dropout_only_in_training():
    model = randomize_(DecoderOnlyModel(tiny_config(dropout=0.5)))
    x = torch.randn(2, 6, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(inputs_embeds=x).last_hidden_state, model(inputs_embeds=x).last_hidden_state
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c = model(inputs_embeds=x).last_hidden_state
    assert not torch.allclose(a, c)
    no_dropout = randomize_(DecoderOnlyModel(tiny_config(dropout=0.0))).train()
    with torch.no_grad():
        torch.testing.assert_close(no_dropout(inputs_embeds=x).last_hidden_state, a, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pooler_output_is_padding_invariant(attn):
    model = randomize_(DecoderOnlyModel(tiny_config(embed_dim=12, attn_implementation=attn))).eval()
    rows = torch.randn(1, 5, 12)
    pad = torch.randn(1, 3, 12)
    with torch.no_grad():
        alone = model(inputs_embeds=rows).pooler_output
        left = model(
            inputs_embeds=torch.cat([pad, rows], 1), attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
        ).pooler_output
        right = model(
            inputs_embeds=torch.cat([rows, pad], 1), attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
        ).pooler_output
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)


def test_sequence_classification_uses_the_last_real_token():
    model = randomize_(DecoderOnlyForSequenceClassification(tiny_config(embed_dim=12, num_labels=3))).eval()
    x = torch.randn(2, 7, 12)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        out = model(inputs_embeds=x, attention_mask=mask, labels=torch.tensor([0, 2]))
        second_alone = model(inputs_embeds=x[1:, :4]).logits
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    torch.testing.assert_close(out.logits[1:], second_alone, rtol=1e-5, atol=1e-5)
    expected = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2]))
    torch.testing.assert_close(out.loss, expected)


def test_tied_embeddings():
    model = DecoderOnlyForCausalLM(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = DecoderOnlyForCausalLM(tiny_config())
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


AUTO_CASES = [
    (AutoModel, DecoderOnlyModel, {}),
    (AutoModelForCausalLM, DecoderOnlyForCausalLM, {}),
    (
        AutoModelForCausalLM,
        DecoderOnlyForCausalLM,
        {"tie_word_embeddings": True, "yarn": True, "interleave_rope": True},
    ),
    (AutoModelForSequenceClassification, DecoderOnlyForSequenceClassification, {"embed_dim": 12, "num_labels": 4}),
]


@pytest.mark.parametrize("auto_class, cls, overrides", AUTO_CASES)
def test_save_and_load_through_auto_classes_is_bit_exact(tmp_path, auto_class, cls, overrides):
    model = randomize_(cls(tiny_config(**overrides))).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DecoderOnlyConfig)
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name
    kwargs = (
        {"inputs_embeds": torch.randn(2, 5, 12)}
        if "embed_dim" in overrides
        else {"input_ids": torch.randint(0, 64, (2, 5))}
    )
    with torch.no_grad():
        first, second = model(**kwargs), loaded(**kwargs)
    assert torch.equal(first[0], second[0])


def test_from_pretrained_in_bfloat16(tmp_path):
    model = randomize_(DecoderOnlyForCausalLM(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = loaded(torch.randint(0, 64, (1, 6))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize_(DecoderOnlyForCausalLM(tiny_config())).train()
    ids = torch.randint(0, 64, (2, 9))
    model(ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_past_key_values_is_a_deprecated_alias_of_cache():
    model = randomize_(DecoderOnlyForCausalLM(tiny_config())).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        first = model(ids[:, :5], use_cache=True)
        with pytest.warns(FutureWarning):
            aliased = model(ids[:, 5:], past_key_values=first.cache).logits
        full = model(ids).logits
    torch.testing.assert_close(aliased[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_sequences_longer_than_max_position_embeddings_are_allowed():
    """max_position_embeddings is metadata for transformers utilities, not a length limit (no position table)."""
    model = randomize_(DecoderOnlyModel(tiny_config(max_position_embeddings=16))).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 64, (1, 40)))
    assert out.last_hidden_state.shape == (1, 40, 32) and torch.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, "exactly one of `input_ids` or `inputs_embeds`"),
        (
            {"input_ids": torch.zeros(1, 3, dtype=torch.long), "inputs_embeds": torch.zeros(1, 3, 12)},
            ValueError,
            "exactly one",
        ),
        ({"inputs_embeds": torch.zeros(1, 3, 13)}, ValueError, r"embed_dim=12\], got shape \(1, 3, 13\)"),
        ({"inputs_embeds": torch.zeros(3, 12)}, ValueError, "inputs_embeds` must be"),
        ({"input_ids": torch.tensor([[1, 64]])}, ValueError, r"\[0, vocab_size=64\), got values in \[1, 64\]"),
        ({"input_ids": torch.tensor([[-1, 2]])}, ValueError, "vocab_size=64"),
        ({"input_ids": torch.zeros(1, 3, 12)}, TypeError, "pass continuous feature vectors"),
        (
            {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(3, 3)},
            ValueError,
            r"attention_mask` must be \[batch=2",
        ),
        (
            {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 2)},
            ValueError,
            "attention_mask",
        ),
        (
            {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])},
            ValueError,
            r"rows \[1\] contain no real token",
        ),
        (
            {"input_ids": torch.zeros(1, 3, dtype=torch.long), "position_ids": torch.arange(4)[None]},
            ValueError,
            "position_ids",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    model = DecoderOnlyModel(tiny_config(embed_dim=12)).eval()
    with pytest.raises(error, match=message):
        model(**kwargs)
