"""Lightning layers inside `DecoderOnlyForCausalLM`: pure lightning and hybrid (lightning + gqa) stacks with the
recurrent-state cache, through `forward` and `generate()` (transformers-v5.md §11.3).

Token sequences are compared in float64 so that no near-tie between two logits can flip a greedy choice.
"""

import pytest
import torch
from safetensors import safe_open

from configuration import DecoderOnlyConfig, hybrid_attention_types
from helpers import assert_cached_generation_matches, assert_left_padding_matches_alone, randomize_, tiny_config
from modeling import DecoderOnlyForCausalLM
from modeling.lightning_attention import DecoderOnlyLightningAttention, lightning_decay_rates
from modeling.recurrent_cache import DecoderOnlyLinearAttentionLayer


LAYOUTS = {
    "lightning": {"attention_type": "lightning"},
    "hybrid": {"attention_types": hybrid_attention_types(3, softmax_every=2)},  # lightning, gqa, lightning
    "gqa_first": {"attention_types": ["gqa", "lightning", "lightning"]},
}
BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
PROMPTS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))


def make_model(layout: str, seed: int = 0, dtype=torch.float64, **overrides) -> DecoderOnlyForCausalLM:
    kwargs = {"pad_token_id": 0, "eos_token_id": None, "num_hidden_layers": 3, **LAYOUTS[layout], **overrides}
    config = tiny_config(**kwargs)
    return randomize_(DecoderOnlyForCausalLM(config), scale=0.3, seed=seed).to(dtype).eval()


def test_layouts_build_lightning_layers():
    model = make_model("hybrid", dtype=torch.float32)
    assert model.config.attention_types == ["lightning", "gqa", "lightning"]
    assert model.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    kinds = [type(layer.self_attn) for layer in model.model.layers]
    assert kinds[0] is DecoderOnlyLightningAttention and kinds[2] is DecoderOnlyLightningAttention
    assert kinds[1] is not DecoderOnlyLightningAttention
    # The slope factor uses the GLOBAL layer index: layer 2 of 3 decays (almost) not at all.
    torch.testing.assert_close(model.model.layers[2].self_attn.slope_rate, lightning_decay_rates(4, 2, 3).float())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_prefill_then_steps_equal_full_forward(layout):
    model = make_model(layout, dtype=torch.float32)
    ids = PROMPTS
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        logits, cache = [out.logits], out.cache
        is_lightning = [kind == "linear_attention" for kind in model.config.layer_types]
        assert [isinstance(layer, DecoderOnlyLinearAttentionLayer) for layer in cache.layers] == is_lightning
        out = model(ids[:, 4:7], cache=cache, use_cache=True)  # a multi-token continuation
        logits.append(out.logits)
        for t in range(7, 9):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-5, atol=1e-5)
    assert int(cache.get_seq_length()) == 9


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_greedy_cached_equals_uncached(layout):
    model = make_model(layout)
    kwargs = {"max_new_tokens": 10, "do_sample": False}
    cached = assert_cached_generation_matches(model, PROMPTS, **kwargs)
    with torch.no_grad():
        logits = model(cached).logits
    assert torch.equal(logits[:, 8:-1].argmax(-1), cached[:, 9:])


@pytest.mark.parametrize("layout", ["lightning", "hybrid"])
def test_beam_search_cached_equals_uncached(layout):
    model = make_model(layout)
    kwargs = {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    cached = assert_cached_generation_matches(model, PROMPTS, **kwargs)
    assert cached.shape == (6, 17)


@pytest.mark.parametrize("layout", ["lightning", "hybrid"])
def test_left_padded_batch_equals_each_row_alone(layout):
    model = make_model(layout)
    rows = [PROMPTS[0, :4], PROMPTS[1, :9], PROMPTS[2, :6]]
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    assert_left_padding_matches_alone(model, rows, **kwargs)


@pytest.mark.parametrize("layout", ["lightning", "hybrid"])
@pytest.mark.parametrize("num_assistant_tokens", [1, 2, 5])
def test_assisted_decoding_with_a_different_assistant_equals_greedy(layout, num_assistant_tokens, monkeypatch):
    model = make_model(layout)
    assistant = make_model("lightning", seed=5, num_hidden_layers=1)
    assistant.generation_config.num_assistant_tokens = num_assistant_tokens
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    rollbacks = []
    original_crop = DecoderOnlyLinearAttentionLayer.crop

    def recording_crop(self, tokens_to_remove):
        rollbacks.append(-tokens_to_remove)
        return original_crop(self, tokens_to_remove)

    monkeypatch.setattr(DecoderOnlyLinearAttentionLayer, "crop", recording_crop)
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    prompt = PROMPTS[:1]
    assisted = model.generate(prompt, assistant_model=assistant, **kwargs)
    assert torch.equal(assisted, model.generate(prompt, **kwargs))
    # The assistant disagrees with the model: drafts were rejected, including full-length ones, and rolled back.
    assert max(rollbacks) == num_assistant_tokens


@pytest.mark.parametrize("layout", ["lightning", "hybrid"])
def test_static_cache_equals_dynamic(layout):
    model = make_model(layout)
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    static = model.generate(PROMPTS, cache_implementation="static", **kwargs)
    assert torch.equal(static, model.generate(PROMPTS, **kwargs))


@pytest.mark.parametrize("layout", ["lightning", "hybrid"])
def test_packed_sequences_equal_separate_rows(layout):
    """Padding-free packing: restarting position_ids with no mask restart the lightning state."""
    model = make_model(layout)
    pieces = [PROMPTS[0, :5], PROMPTS[1, :3], PROMPTS[2, :6]]
    packed = torch.cat(pieces)[None]
    position_ids = torch.cat([torch.arange(len(piece)) for piece in pieces])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
        separate = torch.cat([model(piece[None], use_cache=False).logits for piece in pieces], dim=1)
    torch.testing.assert_close(logits, separate, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["lightning", "hybrid"])
def test_logits_do_not_depend_on_block_size(layout):
    ids = torch.randint(1, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = [make_model(layout, block_size=block_size)(ids).logits for block_size in (1, 4, 5, 64)]
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=0, atol=1e-10)


def test_from_pretrained_restores_the_decay_buffers(tmp_path):
    """The buffers are not saved; `_init_weights` must recompute them (`init_buffers`), or they hold garbage."""
    model = make_model("hybrid", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        assert not [key for key in checkpoint.keys() if key.endswith(BUFFERS)]
    loaded = DecoderOnlyForCausalLM.from_pretrained(tmp_path).eval()
    for layer_idx in (0, 2):
        for name in BUFFERS:
            restored = getattr(loaded.model.layers[layer_idx].self_attn, name)
            torch.testing.assert_close(restored, getattr(model.model.layers[layer_idx].self_attn, name), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROMPTS).logits, model(PROMPTS).logits, rtol=0, atol=0)


def test_spec_lightning_example_builds_and_runs():
    config = DecoderOnlyConfig(attention_type="lightning", vocab_size=128)
    assert config.num_key_value_heads == 2 and config.layer_types == ["linear_attention"] * 4
    model = DecoderOnlyForCausalLM(config).eval()
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, DecoderOnlyLightningAttention)
    # H = 8 heads for q, k and v (num_key_value_heads is not used by lightning layers), head_dim 32.
    assert attention.qkv_proj.weight.shape == (3 * 8 * 32, 256) and attention.norm.weight.shape == (256,)
    ids = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(2))  # > block_size 64, not a multiple
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.shape == (2, 70, 128) and torch.isfinite(out.logits).all()
    assert int(out.cache.get_seq_length()) == 70
    generated = model.generate(ids[:1, :10], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 13)
