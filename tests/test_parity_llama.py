"""Parity with transformers' own Llama and Qwen2: converted models give the same logits and the same generations."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from modeling import DecoderOnlyForCausalLM
from helpers import randomize_


SOURCE_KWARGS = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SOURCES = {
    "llama": lambda attn: LlamaForCausalLM(LlamaConfig(**SOURCE_KWARGS, attn_implementation=attn)),
    "llama_bias_yarn": lambda attn: LlamaForCausalLM(
        LlamaConfig(
            **SOURCE_KWARGS,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            attn_implementation=attn,
        )
    ),
    "qwen2": lambda attn: Qwen2ForCausalLM(Qwen2Config(**SOURCE_KWARGS, attn_implementation=attn)),
    "llama_tied": lambda attn: LlamaForCausalLM(
        LlamaConfig(**SOURCE_KWARGS, tie_word_embeddings=True, attn_implementation=attn)
    ),
}


def make_pair(name: str, attn: str):
    torch.manual_seed(0)
    source = randomize_(SOURCES[name](attn), scale=0.15).eval()
    if source.config.tie_word_embeddings:
        source.tie_weights()
    converted = DecoderOnlyForCausalLM.from_llama(source)
    converted.set_attn_implementation(attn)
    return source, converted


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_logits_match(name, attn):
    source, converted = make_pair(name, attn)
    input_ids = torch.randint(3, 96, (3, 21), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # a left-padded row
    with torch.no_grad():
        for mask in (None, attention_mask):
            expected = source(input_ids, attention_mask=mask).logits
            actual = converted(input_ids, attention_mask=mask).logits
            real = slice(None) if mask is None else mask.bool()
            assert (expected[real] - actual[real]).abs().max() <= 1e-5


def test_conversion_keeps_the_source_structure():
    source, converted = make_pair("qwen2", "sdpa")
    config = converted.config
    assert config.final_norm == "rmsnorm" and config.dropout == 0.0
    assert config.attention_bias and not config.attention_output_bias
    assert converted.model.input_proj is None
    attn = converted.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    torch.testing.assert_close(attn.q_proj.bias, source.model.layers[0].self_attn.q_proj.bias, rtol=0, atol=0)
    _, yarn = make_pair("llama_bias_yarn", "sdpa")
    assert yarn.config.yarn and yarn.config.yarn_scale == 4.0 and yarn.config.yarn_original_max_position == 16
    _, tied = make_pair("llama_tied", "sdpa")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_generation_matches(name, attn):
    source, converted = make_pair(name, attn)
    prompt = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = source.generate(prompt, **kwargs)
    for use_cache in (True, False):
        assert torch.equal(converted.generate(prompt, use_cache=use_cache, **kwargs), expected)


def test_from_saved_folder_and_cli(tmp_path):
    from modeling.convert import main

    source, converted = make_pair("qwen2", "sdpa")
    source.save_pretrained(tmp_path / "qwen2")
    from_folder = DecoderOnlyForCausalLM.from_llama(tmp_path / "qwen2")
    ids = torch.randint(3, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(from_folder(ids).logits, converted(ids).logits, rtol=0, atol=0)
    main([str(tmp_path / "qwen2"), str(tmp_path / "out"), "--set", "window_size=128"])
    reloaded = DecoderOnlyForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.window_size == 128
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, converted(ids).logits, rtol=0, atol=0)


def test_unsupported_sources_are_rejected():
    bad = Qwen2ForCausalLM(Qwen2Config(**SOURCE_KWARGS, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    with pytest.raises(ValueError, match="layer_types"):
        DecoderOnlyForCausalLM.from_llama(bad)
    with pytest.raises(TypeError, match="source must be a PreTrainedModel"):
        DecoderOnlyForCausalLM.from_llama(42)
