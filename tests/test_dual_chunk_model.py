"""Dual Chunk Attention inside `DecoderOnlyForCausalLM`: generation with every cache path, conversion from
Llama / Qwen2 (equal up to chunk_size + 1 tokens, different beyond) and the DCA config surface."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from configuration import DecoderOnlyConfig
from helpers import assert_cached_generation_matches, assert_left_padding_matches_alone, randomize_, tiny_config
from modeling import DecoderOnlyForCausalLM
from modeling.dual_chunk_attention import DecoderOnlyDualChunkAttention


CHUNK = {"chunk_size": 12, "local_size": 2}  # c = 10: prompts of 9 tokens plus 16 new ones cross two chunk borders
PROMPTS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))


def make_model(attn: str = "sdpa", seed: int = 0, **overrides) -> DecoderOnlyForCausalLM:
    config = tiny_config(
        pad_token_id=0, eos_token_id=None, attention_type="dual_chunk", attn_implementation=attn, **{**CHUNK, **overrides}
    )
    return randomize_(DecoderOnlyForCausalLM(config), scale=0.3, seed=seed).eval()


def test_layers_are_dual_chunk():
    model = make_model()
    assert all(isinstance(layer.self_attn, DecoderOnlyDualChunkAttention) for layer in model.model.layers)
    assert model.config.layer_types == ["full_attention"] * 2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_cached_equals_uncached(attn):
    model = make_model(attn)
    kwargs = {"max_new_tokens": 16, "do_sample": False}
    cached = assert_cached_generation_matches(model, PROMPTS, **kwargs)
    with torch.no_grad():
        logits = model(cached).logits
    assert torch.equal(logits[:, 8:-1].argmax(-1), cached[:, 9:])


def test_beam_search_cached_equals_uncached():
    model = make_model()
    kwargs = {"max_new_tokens": 12, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    cached = assert_cached_generation_matches(model, PROMPTS, **kwargs)
    assert cached.shape == (6, 21)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_equals_each_row_alone(attn):
    """Chunks come from position ids, so a row's chunk borders do not move with its padding."""
    model = make_model(attn)
    rows = [PROMPTS[0, :4], PROMPTS[1, :9], PROMPTS[2, :6]]
    kwargs = {"max_new_tokens": 16, "do_sample": False}
    assert_left_padding_matches_alone(model, rows, **kwargs)


def test_prefill_then_single_steps_equal_full_forward():
    model = make_model()
    ids = torch.randint(1, 64, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        steps, cache = [out.logits], out.cache
        out = model(ids[:, 7:19], cache=cache, use_cache=True)  # a chunked-prefill continuation
        steps.append(out.logits)
        for t in range(19, 30):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 30


def test_static_cache_equals_dynamic():
    model = make_model()
    kwargs = {"max_new_tokens": 16, "do_sample": False}
    assert torch.equal(
        model.generate(PROMPTS, cache_implementation="static", **kwargs), model.generate(PROMPTS, **kwargs)
    )


@pytest.mark.parametrize("num_assistant_tokens", [1, 2, 5])
def test_assisted_decoding_with_a_different_assistant_equals_greedy(num_assistant_tokens):
    """The assistant's drafts are partly rejected, so both caches get cropped."""
    model = make_model()
    assistant = make_model(seed=5, num_hidden_layers=1)
    assistant.generation_config.num_assistant_tokens = num_assistant_tokens
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    kwargs = {"max_new_tokens": 16, "do_sample": False}
    prompt = PROMPTS[:1]
    assert torch.equal(model.generate(prompt, assistant_model=assistant, **kwargs), model.generate(prompt, **kwargs))


def test_attention_weights_are_returned_with_eager():
    model = make_model("eager")
    with torch.no_grad():
        out = model(PROMPTS, output_attentions=True)
    assert len(out.attentions) == 2
    assert out.attentions[0].shape == (3, 4, 9, 9)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, 4, 9), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Conversion from Llama / Qwen2
# --------------------------------------------------------------------------------------------------------------------

SOURCE_KWARGS = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
}
SOURCES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SOURCE_KWARGS, attention_bias=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SOURCE_KWARGS)),  # bias on q/k/v, none on o
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_from_llama_equals_source_up_to_chunk_size_plus_one(name):
    torch.manual_seed(0)
    source = randomize_(SOURCES[name](), scale=0.4).eval()
    chunk_size, local_size = 8, 2
    converted = DecoderOnlyForCausalLM.from_llama(
        source, attention_type="dual_chunk", chunk_size=chunk_size, local_size=local_size
    )
    assert isinstance(converted.model.layers[0].self_attn, DecoderOnlyDualChunkAttention)
    if name == "qwen2":
        assert converted.model.layers[0].self_attn.o_proj.bias is None
        assert converted.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(1, 64, (2, chunk_size + 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source(ids).logits
        for length in (chunk_size - local_size, chunk_size, chunk_size + 1):
            torch.testing.assert_close(converted(ids[:, :length]).logits, expected[:, :length], rtol=1e-5, atol=1e-5)
        beyond = converted(ids).logits
    # Positions up to cs are exact; from position cs + 1 on the successive-chunk distances are clamped.
    torch.testing.assert_close(beyond[:, : chunk_size + 1], expected[:, : chunk_size + 1], rtol=1e-5, atol=1e-5)
    assert (beyond[:, chunk_size + 1 :] - expected[:, chunk_size + 1 :]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


def test_qwen_style_dual_chunk_config_is_accepted():
    qwen = {"chunk_size": 32, "local_size": 4, "original_max_position_embeddings": 24}
    config = DecoderOnlyConfig(attention_type="dual_chunk", dual_chunk_attention_config=qwen)
    layer = DecoderOnlyDualChunkAttention(config, layer_idx=0)
    assert (layer.chunk_size, layer.local_size, layer.chunk_len) == (32, 4, 28)
    assert layer.original_max_position_embeddings == 24
    assert DecoderOnlyConfig.from_dict(config.to_dict()).dual_chunk_attention_config == qwen


@pytest.mark.parametrize(
    "bad", [{"sparse_attention_config": {}}, {"sparse_attention_enabled": True}, {"sparse_attention_threshold": 0.9}]
)
def test_sparse_dual_chunk_keys_are_rejected(bad):
    with pytest.raises(ValueError, match="dual_chunk_attention_config"):
        DecoderOnlyConfig(attention_type="dual_chunk", dual_chunk_attention_config={"chunk_size": 32, **bad})


def test_yarn_with_dual_chunk_warns():
    with pytest.warns(UserWarning, match="dual_chunk"):
        DecoderOnlyConfig(yarn=True, attention_type="dual_chunk")
