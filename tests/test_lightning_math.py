"""Lightning Attention-2 (attention-math §4): the core against float64 oracles, the layer against transformers'
`MiniMaxLightningAttention`, and the layer with its recurrent-state cache layer.

The oracles are written independently of `modeling/lightning_attention.py`: a dense `M`-matrix parallel form (decays
as powers `λ^Δ`) and a token-by-token recurrence.
"""

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer
from transformers.models.minimax.configuration_minimax import MiniMaxConfig
from transformers.models.minimax.modeling_minimax import MiniMaxCache, MiniMaxLightningAttention

from helpers import randomize_, tiny_config
from modeling.lightning_attention import (
    DecoderOnlyLightningAttention,
    lightning_attention_blockwise,
    lightning_attention_step,
    lightning_decay_rates,
    lightning_layer_factor,
    lightning_slopes,
)
from modeling.recurrent_cache import DecoderOnlyLinearAttentionLayer, ensure_recurrent_cache_layers


F64 = torch.float64
# Strong, medium, weak and almost no decay (the last layer of a deep stack).
RATES = torch.tensor([0.5, 0.1, 1e-3, 1e-5], dtype=F64)


# --------------------------------------------------------------------------------------------------------- oracles
def parallel_oracle(q, k, v, rates, initial_state=None):
    """`O = ((Q Kᵀ) ⊙ M) V + (Q ⊙ λ^(t+1)) S0` with a dense `M[t,j] = λ^(t-j)` (j ≤ t); final state in closed form."""
    length = q.shape[2]
    lam = torch.exp(-rates)[:, None, None]
    t = torch.arange(length, dtype=F64)
    distance = t[:, None] - t[None, :]
    mask = torch.where(distance >= 0, lam ** distance.clamp(min=0), torch.zeros(()))
    out = ((q @ k.transpose(-1, -2)) * mask) @ v
    key_weight = lam ** (length - 1 - t)[:, None]  # λ^(T-1-j)
    final = (k * key_weight).transpose(-1, -2) @ v
    if initial_state is not None:
        out = out + (q * lam ** (t + 1)[:, None]) @ initial_state
        final = final + lam**length * initial_state
    return out, final


def recurrent_oracle(q, k, v, rates, initial_state=None):
    """`S_t = λ S_{t-1} + k_tᵀ v_t`, `o_t = q_t S_t`, one token at a time. Returns outputs and every state."""
    batch, heads, length, dim = q.shape
    lam = torch.exp(-rates)[:, None, None]
    state = torch.zeros(batch, heads, dim, v.shape[-1], dtype=F64) if initial_state is None else initial_state
    outputs, states = [], []
    for t in range(length):
        state = lam * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, None, :] @ state)[:, :, 0])
        states.append(state)
    return torch.stack(outputs, dim=2), torch.stack(states, dim=2)


def random_qkv(batch=2, heads=4, length=13, dim=5, value_dim=6, seed=0, dtype=F64):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, heads, length, n, generator=generator, dtype=F64).to(dtype)
        for n in (dim, dim, value_dim)
    )
    state = torch.randn(batch, heads, dim, value_dim, generator=generator, dtype=F64)
    return q, k, v, state


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------------------------ slopes, factors
@pytest.mark.parametrize(
    "heads, expected",
    [
        (1, [2**-8]),
        (3, [0.0625, 0.00390625, 0.25]),
        (4, [1 / 4, 1 / 16, 1 / 64, 1 / 256]),
        (6, [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]),
        (8, [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]),
        (12, [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625, 0.70711, 0.35355, 0.17678, 0.08839]),
    ],
)
def test_slopes_follow_the_alibi_table(heads, expected):
    slopes = lightning_slopes(heads)
    assert slopes.dtype == F64 and slopes.shape == (heads,)
    torch.testing.assert_close(slopes, torch.tensor(expected, dtype=F64), rtol=0, atol=5e-6)


@pytest.mark.parametrize(
    "num_layers, expected", [(1, [1.00001]), (4, [1.00001, 0.666678, 0.333346, 1.3333e-5])]
)
def test_layer_factors_follow_the_table(num_layers, expected):
    factors = [lightning_layer_factor(layer, num_layers) for layer in range(num_layers)]
    assert factors == pytest.approx(expected, abs=1e-6, rel=1e-4)
    rates = lightning_decay_rates(4, num_layers - 1, num_layers)
    torch.testing.assert_close(rates, torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256], dtype=F64) * factors[-1])


# ---------------------------------------------------------------------------------------- block algorithm, float64
@pytest.mark.parametrize(
    "length, block_size",
    [(1, 1), (1, 64), (12, 3), (13, 3), (12, 4), (37, 1), (37, 3), (37, 64), (64, 64), (65, 64), (37, 100)],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_blockwise_matches_parallel_and_recurrent_oracles(length, block_size, with_state):
    q, k, v, state = random_qkv(length=length)
    initial_state = state if with_state else None
    out, final, recorded = lightning_attention_blockwise(q, k, v, RATES, block_size, initial_state=initial_state)
    assert recorded is None and out.dtype == F64 and final.dtype == F64
    parallel_out, parallel_final = parallel_oracle(q, k, v, RATES, initial_state)
    recurrent_out, recurrent_states = recurrent_oracle(q, k, v, RATES, initial_state)
    assert max_err(out, parallel_out) <= 1e-10
    assert max_err(out, recurrent_out) <= 1e-10
    assert max_err(final, parallel_final) <= 1e-10
    assert max_err(final, recurrent_states[:, :, -1]) <= 1e-10


def test_output_and_state_do_not_depend_on_block_size():
    q, k, v, state = random_qkv(length=29)
    reference = lightning_attention_blockwise(q, k, v, RATES, 29, initial_state=state)
    for block_size in (1, 2, 3, 7, 16, 64):
        out, final, _ = lightning_attention_blockwise(q, k, v, RATES, block_size, initial_state=state)
        assert max_err(out, reference[0]) <= 1e-12
        assert max_err(final, reference[1]) <= 1e-12


@pytest.mark.parametrize("first, second, block_size", [(7, 9, 4), (8, 8, 4), (1, 20, 64), (20, 1, 3)])
def test_prefill_then_continuation_equals_full_prefill(first, second, block_size):
    q, k, v, _ = random_qkv(length=first + second)
    full_out, full_final, _ = lightning_attention_blockwise(q, k, v, RATES, block_size)
    head = slice(0, first)
    out1, state1, _ = lightning_attention_blockwise(q[:, :, head], k[:, :, head], v[:, :, head], RATES, block_size)
    out2, state2, _ = lightning_attention_blockwise(
        q[:, :, first:], k[:, :, first:], v[:, :, first:], RATES, block_size, initial_state=state1
    )
    assert max_err(torch.cat([out1, out2], dim=2), full_out) <= 1e-12
    assert max_err(state2, full_final) <= 1e-12

    # Then token-by-token decode from the prefill state.
    state = state1
    for t in range(first, first + second):
        token = slice(t, t + 1)
        out_t, state = lightning_attention_step(q[:, :, token], k[:, :, token], v[:, :, token], RATES, state)
        assert max_err(out_t, full_out[:, :, token]) <= 1e-12
    assert max_err(state, full_final) <= 1e-12


@pytest.mark.parametrize("keep, block_size", [(1, 4), (3, 4), (6, 4), (13, 4), (20, 64)])
def test_recorded_per_token_states_match_the_recurrence(keep, block_size):
    q, k, v, state = random_qkv(length=13)
    out, final, recorded = lightning_attention_blockwise(
        q, k, v, RATES, block_size, initial_state=state, keep_states=keep
    )
    expected_out, expected_states = recurrent_oracle(q, k, v, RATES, state)
    kept = min(keep, 13)
    assert recorded.shape == (2, 4, kept, 5, 6)
    assert max_err(recorded, expected_states[:, :, -kept:]) <= 1e-10
    assert max_err(out, expected_out) <= 1e-10
    assert max_err(final, expected_states[:, :, -1]) <= 1e-10


# ------------------------------------------------------------------------------------------------ packed sequences
def packed_segment_ids(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("block_size", [1, 3, 4, 64])
@pytest.mark.parametrize("keep", [0, 5])
def test_packed_segments_equal_separate_sequences(block_size, keep):
    # Row 0: boundaries inside blocks, on block edges and a one-token sequence; row 1: two sequences.
    packings = [[5, 1, 7, 3], [8, 8]]
    q, k, v, state = random_qkv(length=16)
    segment_ids = torch.stack([packed_segment_ids(lengths) for lengths in packings])
    out, final, recorded = lightning_attention_blockwise(
        q, k, v, RATES, block_size, initial_state=state, segment_ids=segment_ids, keep_states=keep
    )
    for row, lengths in enumerate(packings):
        start = 0
        for index, length in enumerate(lengths):
            piece = slice(start, start + length)
            # Only the row's first sequence continues from the incoming state.
            row_state = state[row : row + 1] if index == 0 else None
            expected_out, expected_states = recurrent_oracle(
                q[row : row + 1, :, piece], k[row : row + 1, :, piece], v[row : row + 1, :, piece], RATES, row_state
            )
            assert max_err(out[row : row + 1, :, piece], expected_out) <= 1e-10
            start += length
        assert max_err(final[row : row + 1], expected_states[:, :, -1]) <= 1e-10
    if keep:
        # The last recorded states of row 1 all lie in its second sequence.
        _, second_states = recurrent_oracle(q[1:, :, 8:], k[1:, :, 8:], v[1:, :, 8:], RATES)
        assert max_err(recorded[1:], second_states[:, :, -keep:]) <= 1e-10


# ---------------------------------------------------------------------------------------- numerics and gradients
@pytest.mark.parametrize("rate", [0.5, 1e-5])
def test_fp32_long_sequence_is_finite_and_accurate(rate):
    rates = torch.tensor([rate, rate], dtype=F64)
    q, k, v, _ = random_qkv(batch=1, heads=2, length=4096, dim=16, value_dim=16, seed=1)
    q, k, v = (torch.nn.functional.silu(x) for x in (q, k, v))  # the layer's inputs: mostly positive
    reference, reference_final, _ = lightning_attention_blockwise(q, k, v, rates, 64)

    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    out, final, _ = lightning_attention_blockwise(q32, k32, v32, rates.float(), 64)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert max_err(out, reference) <= 1e-5 * reference.abs().max().item()
    assert max_err(final, reference_final) <= 1e-5 * reference_final.abs().max().item()
    (out.sum() + final.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (q32, k32, v32))

    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    out_bf16, final_bf16, _ = lightning_attention_blockwise(qb, kb, vb, rates.float(), 64)
    assert out_bf16.dtype == torch.bfloat16 and final_bf16.dtype == torch.float32  # the state stays fp32
    assert torch.isfinite(out_bf16).all()
    assert max_err(out_bf16, reference) <= 3e-2 * reference.abs().max().item()
    out_bf16.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (qb, kb, vb))


@pytest.mark.parametrize("keep", [0, 2])
def test_gradcheck_through_the_block_loop(keep):
    q, k, v, state = random_qkv(batch=1, heads=2, length=7, dim=3, value_dim=2, seed=2)
    rates = torch.tensor([0.3, 0.01], dtype=F64)
    segment_ids = packed_segment_ids([4, 3])[None]
    inputs = tuple(x.clone().requires_grad_() for x in (q, k, v, state))

    def core(q, k, v, state):
        out, final, _ = lightning_attention_blockwise(
            q, k, v, rates, 3, initial_state=state, segment_ids=segment_ids, keep_states=keep
        )
        return out, final

    assert torch.autograd.gradcheck(core, inputs)


@pytest.mark.parametrize("keep", [0, 2])
def test_gradcheck_through_the_batched_blocks(keep):
    # One sequence per row: whole blocks go through the batched path, the short last block through the loop.
    q, k, v, state = random_qkv(batch=2, heads=2, length=8, dim=3, value_dim=2, seed=3)
    rates = torch.tensor([0.3, 0.01], dtype=F64)
    inputs = tuple(x.clone().requires_grad_() for x in (q, k, v, state))

    def core(q, k, v, state):
        out, final, _ = lightning_attention_blockwise(q, k, v, rates, 3, initial_state=state, keep_states=keep)
        return out, final

    assert torch.autograd.gradcheck(core, inputs)


def test_decode_step_matches_recurrence():
    q, k, v, state = random_qkv(length=6)
    expected_out, expected_states = recurrent_oracle(q, k, v, RATES, state)
    for t in range(6):
        out, state = lightning_attention_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], RATES, state)
        assert max_err(out[:, :, 0], expected_out[:, :, t]) <= 1e-12
        assert max_err(state, expected_states[:, :, t]) <= 1e-12


# ------------------------------------------------------------------------------ parity with transformers' MiniMax
def lightning_config(**overrides):
    kwargs = {"attention_type": "lightning", "num_hidden_layers": 3, "block_size": 4}
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def minimax_pair(layer_idx=1, block_size=5, dtype=torch.float32):
    config = lightning_config(block_size=block_size)
    ours = randomize_(DecoderOnlyLightningAttention(config, layer_idx), seed=3).to(dtype).eval()
    minimax_config = MiniMaxConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        num_hidden_layers=config.num_hidden_layers,
        layer_types=["linear_attention"] * config.num_hidden_layers,
        block_size=block_size,
        hidden_act="silu",
        intermediate_size=16,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    reference = MiniMaxLightningAttention(minimax_config, layer_idx).to(dtype).eval()
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"slope_rate", "query_decay", "key_decay", "diagonal_decay"}
    if dtype == F64:  # its decay buffers are computed in fp32; recompute them in float64 for a tight comparison
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(F64)
        try:
            slope_rate = reference.get_slope_rate()
        finally:
            torch.set_default_dtype(default_dtype)
        tables = reference.decay_factors(slope_rate)
        for name, value in zip(("slope_rate", "query_decay", "key_decay", "diagonal_decay"), (slope_rate, *tables)):
            getattr(reference, name).copy_(value)
    return ours, reference


@pytest.mark.parametrize("layer_idx, length", [(0, 13), (1, 10), (2, 7)])
def test_prefill_matches_minimax(layer_idx, length):
    ours, reference = minimax_pair(layer_idx)
    hidden = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected, _ = reference(hidden, position_embeddings=None, attention_mask=attention_mask)
            out, weights = ours(hidden, attention_mask=attention_mask)
            assert weights is None
            assert max_err(out, expected) <= 1e-5


def test_prefill_and_decode_match_minimax_with_its_cache():
    ours, reference = minimax_pair(layer_idx=1)
    config = ours.config
    hidden = torch.randn(2, 14, 32, generator=torch.Generator().manual_seed(5))
    reference_cache, cache = MiniMaxCache(), DynamicCache(config=config)
    ensure_recurrent_cache_layers(cache, config)
    with torch.no_grad():
        expected, _ = reference(hidden[:, :9], position_embeddings=None, attention_mask=None, cache=reference_cache)
        out, _ = ours(hidden[:, :9], cache=cache)
        assert max_err(out, expected) <= 1e-5
        for t in range(9, 14):
            token = hidden[:, t : t + 1]
            expected, expected_state = reference(token, None, None, cache=reference_cache)
            out, _ = ours(token, cache=cache)
            assert max_err(out, expected) <= 1e-5
            assert max_err(cache.layers[1].recurrent_states[0], expected_state) <= 1e-5 * expected_state.abs().max()


def test_final_state_matches_minimax_in_float64():
    ours, reference = minimax_pair(layer_idx=2, block_size=4, dtype=F64)
    hidden = torch.randn(1, 11, 32, generator=torch.Generator().manual_seed(6), dtype=F64)
    cache = DynamicCache(config=ours.config)
    ensure_recurrent_cache_layers(cache, ours.config)
    with torch.no_grad():
        expected, expected_state = reference(hidden, position_embeddings=None, attention_mask=None)
        out, _ = ours(hidden, cache=cache)
    assert cache.layers[2].recurrent_states[0].dtype == F64
    assert max_err(cache.layers[2].recurrent_states[0], expected_state) <= 1e-12
    assert max_err(out, expected) <= 1e-6  # both RMSNorms compute their statistics in fp32


# ------------------------------------------------------------------------------------- the layer with its cache
def lightning_layer(layer_idx=0, dtype=F64, **overrides):
    config = lightning_config(**overrides)
    return randomize_(DecoderOnlyLightningAttention(config, layer_idx), seed=7).to(dtype).eval()


def fresh_cache(config):
    cache = DynamicCache(config=config)
    ensure_recurrent_cache_layers(cache, config)
    return cache


def hidden_states(batch=2, length=11, seed=8, dtype=F64):
    return torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_layer_prefill_then_decode_equals_full_forward(dtype, tol):
    layer = lightning_layer(dtype=dtype)
    hidden = hidden_states(length=12, dtype=dtype)
    cache = fresh_cache(layer.config)
    with torch.no_grad():
        full, _ = layer(hidden)
        pieces = [layer(hidden[:, :5], cache=cache)[0]]
        assert int(cache.get_seq_length()) == 5  # layer 0 is lightning: its counter is the cache length
        pieces.append(layer(hidden[:, 5:9], cache=cache)[0])  # a multi-token continuation (blockwise)
        for t in range(9, 12):
            pieces.append(layer(hidden[:, t : t + 1], cache=cache)[0])
    assert int(cache.get_seq_length()) == 12
    assert cache.layers[0].recurrent_states[0].dtype == (F64 if dtype == F64 else torch.float32)
    assert max_err(torch.cat(pieces, dim=1), full) <= tol


@pytest.mark.parametrize("keep", [0, 6])
def test_layer_in_token_chunks_equals_one_pass(monkeypatch, keep):
    """Long prefills run the layer over runs of `_PREFILL_CHUNK` tokens: outputs, final state and recorded states
    (here spanning a chunk boundary) equal a single pass, also from a cached state with a left-padded row."""
    import modeling.lightning_attention as lightning_module

    layer = lightning_layer()
    hidden = hidden_states(length=17)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[0, :3] = 0

    def run(chunk):
        monkeypatch.setattr(lightning_module, "_PREFILL_CHUNK", chunk)
        cache = fresh_cache(layer.config)
        with torch.no_grad():
            first, _ = layer(hidden[:, :4], attention_mask=mask[:, :4], cache=cache)
            if keep:
                cache.activate_past_recording(recurrent_states_to_keep=keep)
            second, _ = layer(hidden[:, 4:], attention_mask=mask, cache=cache)
        history = cache.layers[0].recurrent_states_history[0] if keep else []
        return torch.cat([first, second], dim=1), cache.layers[0].recurrent_states[0], history

    out, state, history = run(1000)
    for chunk in (1, 3, 5):
        chunked_out, chunked_state, chunked_history = run(chunk)
        assert max_err(chunked_out, out) <= 1e-12
        assert max_err(chunked_state, state) <= 1e-12
        assert len(chunked_history) == len(history) == (keep + 1 if keep else 0)
        assert all(max_err(a, b) <= 1e-12 for a, b in zip(chunked_history, history))


def test_layer_does_not_depend_on_block_size():
    hidden = hidden_states(length=17)
    with torch.no_grad():
        outputs = [lightning_layer(block_size=block_size)(hidden)[0] for block_size in (1, 4, 5, 64)]
    for out in outputs[1:]:
        assert max_err(out, outputs[0]) <= 1e-12


def test_left_padded_row_equals_row_alone():
    layer = lightning_layer()
    hidden = hidden_states(length=9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    # generate()'s positions for a left-padded row: pads get 1, real tokens count from 0.
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache, alone_cache = fresh_cache(layer.config), fresh_cache(layer.config)
    with torch.no_grad():
        batched, _ = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache)
        alone, _ = layer(hidden[:1, 4:], cache=alone_cache)
        assert max_err(batched[:1, 4:], alone) <= 1e-12
        step = hidden_states(length=1, seed=9)
        batched_step, _ = layer(step, cache=cache, position_ids=position_ids[:, -1:] + 1)
        alone_step, _ = layer(step[:1], cache=alone_cache)
    assert max_err(batched_step[:1], alone_step) <= 1e-12


def test_packed_rows_equal_separate_sequences():
    layer = lightning_layer()
    hidden = hidden_states(batch=1, length=12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        packed, _ = layer(hidden, position_ids=position_ids)
        separate = torch.cat([layer(hidden[:, a:b])[0] for a, b in ((0, 5), (5, 8), (8, 12))], dim=1)
    assert max_err(packed, separate) <= 1e-12


@pytest.mark.parametrize("keep", [1, 3])
def test_crop_restores_the_exact_state(keep):
    """Assisted-decoding rollback: after verifying `keep + 1` tokens, `crop(-r)` for any `r <= keep` restores the
    state of the shorter sequence (this fails without the `+1` of transformers-v5.md §8.3)."""
    layer = lightning_layer()
    hidden = hidden_states(batch=1, length=6 + keep + 1)
    for removed in range(keep + 1):
        cache = fresh_cache(layer.config)
        cache.activate_past_recording(recurrent_states_to_keep=keep)
        with torch.no_grad():
            layer(hidden[:, :6], cache=cache)
            cache.crop(0)
            layer(hidden[:, 6:], cache=cache)
            cache.crop(-removed)
            kept = hidden.shape[1] - removed
            reference = fresh_cache(layer.config)
            layer(hidden[:, :kept], cache=reference)
        assert int(cache.get_seq_length()) == kept
        assert torch.equal(cache.layers[0].recurrent_states[0], reference.layers[0].recurrent_states[0]) or (
            max_err(cache.layers[0].recurrent_states[0], reference.layers[0].recurrent_states[0]) <= 1e-12
        )
        assert cache.layers[0].recurrent_states_history[0] == []


def test_crop_requires_recording_and_a_non_positive_count():
    layer = lightning_layer()
    cache = fresh_cache(layer.config)
    with torch.no_grad():
        layer(hidden_states(length=3), cache=cache)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-1)
    cache.activate_past_recording(recurrent_states_to_keep=1)
    with pytest.raises(RuntimeError, match="negative"):
        cache.crop(1)


def test_cache_layer_batch_operations():
    layer = lightning_layer()
    cache = fresh_cache(layer.config)
    with torch.no_grad():
        layer(hidden_states(batch=3, length=5), cache=cache)
    cache_layer = cache.layers[0]
    state = cache_layer.recurrent_states[0].clone()
    assert cache_layer.device == state.device and cache_layer.has_previous_state[0]
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    assert torch.equal(cache_layer.recurrent_states[0], state[beam_idx])
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache_layer.recurrent_states[0], state[beam_idx].repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(cache_layer.recurrent_states[0], state[[2, 0]])
    cache.reset()
    assert cache.get_recurrent_state(0) is None and int(cache.get_seq_length()) == 0


def test_ensure_recurrent_cache_layers():
    config = lightning_config(attention_types=["lightning", "gqa", "lightning"])
    # DynamicCache(config): stock layers are swapped, recording flags set before the first forward survive.
    cache = DynamicCache(config=config)
    cache.activate_past_recording(recurrent_states_to_keep=4)
    assert type(cache.layers[0]) is LinearAttentionLayer
    ensure_recurrent_cache_layers(cache, config)
    expected_types = [DecoderOnlyLinearAttentionLayer, DynamicLayer, DecoderOnlyLinearAttentionLayer]
    assert [type(layer) for layer in cache.layers] == expected_types
    assert cache.layers[0].record_past and cache.get_recurrent_states_to_keep(0) == 4
    swapped = list(cache.layers)
    ensure_recurrent_cache_layers(cache, config)  # idempotent
    assert all(a is b for a, b in zip(swapped, cache.layers))
    # A bare DynamicCache() gets every layer, StaticCache keeps its static softmax layers.
    bare = DynamicCache()
    ensure_recurrent_cache_layers(bare, config)
    assert [type(layer) for layer in bare.layers] == expected_types
    static = StaticCache(config=config, max_cache_len=16)
    ensure_recurrent_cache_layers(static, config)
    assert isinstance(static.layers[2], DecoderOnlyLinearAttentionLayer)
    assert type(static.layers[1]).__name__ == "StaticLayer"
    # No-ops, and a cache from another model is refused.
    ensure_recurrent_cache_layers(None, config)
    gqa_cache = DynamicCache(config=tiny_config())
    ensure_recurrent_cache_layers(gqa_cache, tiny_config())
    assert all(type(layer) is DynamicLayer for layer in gqa_cache.layers)
    gqa_cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)  # layer 0 now holds keys and values
    with pytest.raises(ValueError, match="lightning"):
        ensure_recurrent_cache_layers(gqa_cache, config)


def test_layer_initialises_its_buffers_and_parameters():
    layer = DecoderOnlyLightningAttention(lightning_config(num_attention_heads=4), layer_idx=1)
    weights = {"qkv_proj.weight", "output_gate.weight", "norm.weight", "out_proj.weight"}
    assert dict(layer.named_parameters()).keys() == weights
    assert layer.state_dict().keys() == weights  # the decay buffers are not persistent
    assert layer.qkv_proj.weight.shape == (3 * 32, 32) and layer.out_proj.weight.shape == (32, 32)
    expected = torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]) * lightning_layer_factor(1, 3)
    torch.testing.assert_close(layer.slope_rate, expected)
    for name in ("slope_rate", "query_decay", "key_decay", "diagonal_decay"):
        getattr(layer, name).fill_(4.2e2)  # what from_pretrained can leave in a non-persistent buffer
    values = layer.init_buffers()
    assert values.keys() == {"slope_rate", "query_decay", "key_decay", "diagonal_decay"}
    torch.testing.assert_close(values["slope_rate"], expected)
    assert values["diagonal_decay"].shape == (4, 4, 4) and values["diagonal_decay"][:, 0, 1].eq(0).all()


def test_layer_in_bfloat16_and_old_cache_names():
    layer = lightning_layer(dtype=torch.float32)
    hidden = hidden_states(length=9, dtype=torch.float32)
    with torch.no_grad():
        reference, _ = layer(hidden)
        cache = fresh_cache(layer.config)
        with pytest.warns(FutureWarning, match="past_key_values"):
            out, _ = layer.to(torch.bfloat16)(hidden.to(torch.bfloat16), past_key_values=cache)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32  # the state stays fp32
    assert int(cache.get_seq_length()) == 9  # `past_key_values=` reached the cache
    assert max_err(out, reference) <= 5e-2 * reference.abs().max().item()
    with torch.no_grad(), pytest.warns(FutureWarning, match="cache_params"):
        layer(hidden.to(torch.bfloat16), cache_params=cache)
    assert int(cache.get_seq_length()) == 18
