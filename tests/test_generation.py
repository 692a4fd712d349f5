"""generate() on softmax (gqa) models: cached == uncached for greedy, sampling and beam search; left padding exact."""

import pytest
import torch

from helpers import assert_cached_generation_matches, assert_left_padding_matches_alone, randomize_, tiny_config
from modeling import DecoderOnlyForCausalLM


LAYOUTS = {
    "gqa": {},
    "irope_yarn": {
        "num_hidden_layers": 3,
        "interleave_rope": True,
        "yarn": True,
        "yarn_scale": 4,
        "yarn_original_max_position": 8,
    },
}


def make_model(layout: str, attn: str = "sdpa") -> DecoderOnlyForCausalLM:
    config = tiny_config(pad_token_id=0, eos_token_id=None, attn_implementation=attn, **LAYOUTS[layout])
    return randomize_(DecoderOnlyForCausalLM(config), scale=0.3).eval()


PROMPTS = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_greedy_cached_equals_uncached(layout, attn):
    model = make_model(layout, attn)
    kwargs = {"max_new_tokens": 10, "do_sample": False}
    cached = assert_cached_generation_matches(model, PROMPTS, **kwargs)
    # And the greedy tokens are the argmax of a full forward over the generated sequence.
    with torch.no_grad():
        logits = model(cached).logits
    assert torch.equal(logits[:, 8:-1].argmax(-1), cached[:, 9:])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sampling_with_a_fixed_seed_cached_equals_uncached(layout):
    model = make_model(layout)
    kwargs = {"max_new_tokens": 10, "do_sample": True, "top_k": 20, "temperature": 1.3}
    torch.manual_seed(123)
    cached = model.generate(PROMPTS, **kwargs)
    torch.manual_seed(123)
    uncached = model.generate(PROMPTS, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_beam_search_cached_equals_uncached(layout):
    model = make_model(layout)
    kwargs = {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    cached = assert_cached_generation_matches(model, PROMPTS, **kwargs)
    assert cached.shape == (6, 17)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_left_padded_batch_equals_each_row_alone(layout):
    model = make_model(layout)
    rows = [PROMPTS[0, :4], PROMPTS[1, :9], PROMPTS[2, :6]]
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    assert_left_padding_matches_alone(model, rows, **kwargs)


def test_prefill_then_single_steps_equal_full_forward():
    model = make_model("irope_yarn")
    ids = PROMPTS[:, :9]
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(5, 9):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 9


def test_static_cache_equals_dynamic():
    model = make_model("gqa")
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(
        model.generate(PROMPTS, cache_implementation="static", **kwargs), model.generate(PROMPTS, **kwargs)
    )


def test_assisted_decoding_with_a_different_assistant_equals_greedy():
    model = make_model("gqa")
    assistant = randomize_(DecoderOnlyForCausalLM(tiny_config(pad_token_id=0, num_hidden_layers=1)), seed=5).eval()
    assistant.generation_config.num_assistant_tokens = 3
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    kwargs = {"max_new_tokens": 12, "do_sample": False}
    prompt = PROMPTS[:1]
    assert torch.equal(model.generate(prompt, assistant_model=assistant, **kwargs), model.generate(prompt, **kwargs))


def test_packed_sequences_equal_separate_rows():
    """Padding-free packing: restarting position_ids with no mask give block-diagonal attention."""
    model = make_model("irope_yarn")
    first, second = PROMPTS[0, :5], PROMPTS[1, :4]
    packed = torch.cat([first, second])[None]
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(model.train()(packed, position_ids=position_ids).logits, logits, rtol=0, atol=0)
        model.eval()
        torch.testing.assert_close(logits[:, :5], model(first[None]).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[:, 5:], model(second[None]).logits, rtol=1e-5, atol=1e-5)
