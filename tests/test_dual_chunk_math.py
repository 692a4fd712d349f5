"""Dual Chunk Attention at module level against independent oracles (attention-math §5.8).

The oracle is the plain formula in float64: for every (query, key) pair it picks the part from the two positions,
rotates q and k explicitly (pair i with i + d/2) at the remapped positions, applies the temperature and takes one
softmax per row. Its RoPE angles follow the project convention (fp32 products of integer positions and fp32
frequencies, attention-math §2 / §5.7), so float64 comparisons can be tight.
"""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

import modeling.dual_chunk_attention as dca
from configuration import DecoderOnlyConfig
from modeling.dual_chunk_attention import (
    DecoderOnlyDualChunkAttention,
    dual_chunk_fast_attention,
    dual_chunk_parts,
    dual_chunk_query_positions,
)


THETA = 10000.0


def make_layer(chunk_size=8, local_size=2, heads=4, kv_heads=2, head_dim=8, original=None, dtype=torch.float64,
               attn_implementation="sdpa", seed=0, bias=True, scale=0.5):  # fmt: skip
    config = DecoderOnlyConfig(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=1,
        attention_type="dual_chunk",
        dual_chunk_attention_config={
            "chunk_size": chunk_size,
            "local_size": local_size,
            "original_max_position_embeddings": original,
        },
        attention_bias=bias,
        dropout=0.0,
    )
    config._attn_implementation = attn_implementation
    layer = DecoderOnlyDualChunkAttention(config, layer_idx=0).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(scale * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return layer


def use_path(layer, path: str, rows_per_tile: int = 5):
    """Force the reference (selected scores) or the fast (tiled flash + LSE merge) path."""
    layer.fast_path_min_tokens = 0 if path == "fast" else 10**9
    layer.rows_per_tile = layer.reference_rows_per_tile = rows_per_tile
    return layer


def inputs(batch, length, dtype=torch.float64, seed=1):
    return torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------------------------------


def rope_half_tables(head_dim: int, max_position: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `[P, d/2]` of the fp32 angles `P * theta^(-2i/d)` (attention-math §2), as float64."""
    inv_freq = 1.0 / (THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(max_position + 1, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().double().numpy(), angles.sin().double().numpy()


def rotate(vectors: np.ndarray, position: int, tables) -> np.ndarray:
    """Explicit RoPE of `[..., d]`: the pair (i, i + d/2) is rotated by angle[position, i]."""
    cos, sin = tables[0][position], tables[1][position]
    half = vectors.shape[-1] // 2
    first, second = vectors[..., :half], vectors[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def oracle_distance(p_i: int, p_j: int, chunk_size: int, local_size: int) -> tuple[int, int]:
    """(query rotation, key rotation) of the pair per attention-math §5.2."""
    c = chunk_size - local_size
    n_i, n_j, r_i = p_i // c, p_j // c, p_i % c
    if n_j == n_i:
        query = r_i
    elif n_j == n_i - 1:
        query = min(r_i + c, chunk_size)
    else:
        query = min(2 * c - 1, chunk_size)
    return query, p_j % c


def oracle(layer, x, position_ids, real=None, plain_rope=False, temperature=None):
    """Float64 per-pair DCA (or, with `plain_rope`, ordinary RoPE attention) of `layer`'s weights.

    `real[b, t]` marks real tokens (keys that may be attended; outputs of other rows are left 0). Keys are the real
    tokens of the row with a position <= the query's. `temperature`: None derives Qwen's tau from the config."""
    config = layer.config
    cs, w = config.chunk_size, config.local_size
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    original = config.dual_chunk_attention_config["original_max_position_embeddings"]
    params = {name: p.detach().double().numpy() for name, p in layer.state_dict().items()}

    def project(name, states):
        out = states @ params[f"{name}.weight"].T
        return out + params[f"{name}.bias"] if f"{name}.bias" in params else out

    x = x.detach().double().numpy()
    positions = position_ids.numpy()
    batch, length = positions.shape
    real = np.ones((batch, length), dtype=bool) if real is None else real.numpy()
    q = project("q_proj", x).reshape(batch, length, heads, d)
    k = np.repeat(project("k_proj", x).reshape(batch, length, kv_heads, d), heads // kv_heads, axis=2)
    v = np.repeat(project("v_proj", x).reshape(batch, length, kv_heads, d), heads // kv_heads, axis=2)
    tables = rope_half_tables(d, int(positions.max()) + 2 * cs + 1)
    out = np.zeros((batch, length, heads, d))
    for b in range(batch):
        row_length = 1 + int(positions[b][real[b]].max())
        tau = temperature
        if tau is None:
            tau = max(1.0, 0.1 * math.log(row_length / original) + 1.0) ** 2 if original else 1.0
        for i in range(length):
            if not real[b, i]:
                continue
            keys = [j for j in range(length) if real[b, j] and positions[b, j] <= positions[b, i]]
            scores = np.empty((heads, len(keys)))
            for n, j in enumerate(keys):
                if plain_rope:
                    query_position, key_position = positions[b, i], positions[b, j]
                else:
                    query_position, key_position = oracle_distance(positions[b, i], positions[b, j], cs, w)
                rotated_q = rotate(q[b, i], query_position, tables)
                rotated_k = rotate(k[b, j], key_position, tables)
                scores[:, n] = tau * (rotated_q * rotated_k).sum(-1) / math.sqrt(d)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[b, i] = np.einsum("hn,nhd->hd", probs, v[b, keys])
    y = project("o_proj", out.reshape(batch, length, heads * d))
    return torch.from_numpy(y * real[..., None])


def positions_for(batch, length):
    return torch.arange(length)[None].expand(batch, length)


# --------------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------------


DISTANCE_TABLE = {  # attention-math §5.2, cs = 8, w = 2: relative distances to keys 0 ... p_i
    6: [6, 5, 4, 3, 2, 1, 0],
    8: [8, 7, 6, 5, 4, 3, 2, 1, 0],
    9: [8, 7, 6, 5, 4, 3, 3, 2, 1, 0],
    11: [8, 7, 6, 5, 4, 3, 5, 4, 3, 2, 1, 0],
    12: [8, 7, 6, 5, 4, 3, 6, 5, 4, 3, 2, 1, 0],
    15: [8, 7, 6, 5, 4, 3, 8, 7, 6, 5, 4, 3, 3, 2, 1, 0],
}


@pytest.mark.parametrize("p_i", sorted(DISTANCE_TABLE))
def test_distance_table(p_i):
    chunk_size, chunk_len = 8, 6
    keys = torch.arange(p_i + 1)[None]
    query_rotations = torch.stack(dual_chunk_query_positions(torch.tensor([[p_i]]), chunk_len, chunk_size))[:, 0, 0]
    parts = dual_chunk_parts(torch.tensor([[p_i]]), keys, chunk_len)[0, 0]
    distances = query_rotations[parts] - keys[0] % chunk_len
    assert distances.tolist() == DISTANCE_TABLE[p_i]
    assert [oracle_distance(p_i, j, 8, 2)[0] - oracle_distance(p_i, j, 8, 2)[1] for j in range(p_i + 1)] == (
        DISTANCE_TABLE[p_i]
    )


@pytest.mark.parametrize("path", ["reference", "fast", "fast_math"])
@pytest.mark.parametrize(
    "chunk_size, local_size, length, kv_heads", [(8, 2, 30, 2), (24, 6, 70, 2), (24, 6, 70, 1), (8, 2, 30, 4)]
)
def test_paths_match_oracle(monkeypatch, path, chunk_size, local_size, length, kv_heads):
    if path == "fast_math":
        monkeypatch.setattr(dca, "_FLASH_CPU", None)
    layer = use_path(make_layer(chunk_size, local_size, kv_heads=kv_heads), "reference" if path == "reference" else "fast")
    x = inputs(2, length)
    expected = oracle(layer, x, positions_for(2, length))
    out, _ = layer(x, position_ids=positions_for(2, length))
    assert (out - expected).abs().max() <= 1e-10


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_position_offset_matches_oracle(path):
    """Rows starting at positions > 0 (e.g. a continuation without cache) rotate by position, not by index."""
    layer = use_path(make_layer(24, 6), path)
    x = inputs(2, 40)
    position_ids = torch.stack([torch.arange(40) + 5, torch.arange(40) + 23])
    out, _ = layer(x, position_ids=position_ids)
    assert (out - oracle(layer, x, position_ids)).abs().max() <= 1e-10


def llama_attention_like(layer, dtype):
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=layer.config.num_attention_heads,
        num_key_value_heads=layer.config.num_key_value_heads,
        head_dim=layer.head_dim,
        intermediate_size=64,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )
    config._attn_implementation = "sdpa"
    reference = LlamaAttention(config, layer_idx=0).to(dtype).eval()
    reference.load_state_dict(layer.state_dict())
    return reference, LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_equals_rope_attention_up_to_chunk_size_plus_one(path):
    chunk_size, local_size = 8, 2
    chunk_len = chunk_size - local_size
    layer32 = use_path(make_layer(chunk_size, local_size, dtype=torch.float32), path)
    layer64 = use_path(make_layer(chunk_size, local_size, dtype=torch.float64), path)
    llama, rotary = llama_attention_like(layer32, torch.float32)
    for length in (chunk_len, chunk_len + 1, chunk_size, chunk_size + 1, chunk_size + 2):
        x = inputs(2, length)
        position_ids = positions_for(2, length)
        out64, _ = layer64(x, position_ids=position_ids)
        plain = oracle(layer64, x, position_ids, plain_rope=True)
        out32, _ = layer32(x.float(), position_ids=position_ids)
        expected32, _ = llama(x.float(), position_embeddings=rotary(x.float(), position_ids), attention_mask=None)
        if length <= chunk_size + 1:
            # Exact in math; the fp32 RoPE tables of different absolute angles round differently (~1e-7).
            assert (out64 - plain).abs().max() <= 1e-6 * plain.abs().max(), length
            assert (out32 - expected32).abs().max() <= 1e-5 * expected32.abs().max(), length
        else:
            # From cs + 2 on, the last query's successive-chunk distances are clamped.
            assert (out64[:, -1] - plain[:, -1]).abs().max() > 1e-2
            assert (out64[:, :-1] - plain[:, :-1]).abs().max() <= 1e-6 * plain.abs().max()
            assert (out32[:, -1] - expected32[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
def test_prefill_equals_chunked_prefill_equals_decode(path, cache_class):
    """L = 30 <= L_orig = 32: the temperature is configured but 1, so every split gives the same outputs."""
    layer = use_path(make_layer(8, 2, original=32), path, rows_per_tile=4)
    length, batch = 30, 2
    x = inputs(batch, length)
    full, _ = layer(x, position_ids=positions_for(batch, length))
    if cache_class == "dynamic":
        cache = DynamicCache()
    else:
        cache = StaticCache(config=layer.config, max_cache_len=40)
    pieces, start = [], 0
    for size in [11, 9] + [1] * (length - 20):
        position_ids = torch.arange(start, start + size)[None].expand(batch, size)
        out, _ = layer(x[:, start : start + size], position_ids=position_ids, cache=cache)
        pieces.append(out)
        start += size
    assert int(cache.get_seq_length()) == length
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-12


def test_static_cache_equals_dynamic_cache_past_chunks():
    """Continuations well past several chunks (cs=8, w=2: positions up to 40) with both cache kinds and no mask."""
    layer = make_layer(8, 2)
    x = inputs(1, 41)
    outputs = {}
    for kind, cache in (("dynamic", DynamicCache()), ("static", StaticCache(config=layer.config, max_cache_len=48))):
        pieces = [layer(x[:, :17], position_ids=positions_for(1, 17), cache=cache)[0]]
        for t in range(17, 41):
            pieces.append(layer(x[:, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache)[0])
        outputs[kind] = torch.cat(pieces, dim=1)
    assert torch.equal(outputs["static"], outputs["dynamic"])
    assert (outputs["dynamic"] - oracle(layer, x, positions_for(1, 41))).abs().max() <= 1e-10


def build_mask(layer, x, mask_2d, position_ids, implementation):
    layer.config._attn_implementation = implementation
    return create_causal_mask(
        config=layer.config, inputs_embeds=x, attention_mask=mask_2d, cache=None, position_ids=position_ids
    )


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_left_padding_equals_unpadded_row(path, implementation):
    layer = use_path(make_layer(8, 2), path)
    pads, length = 3, 23
    x = inputs(2, length)
    mask_2d = torch.ones(2, length, dtype=torch.long)
    mask_2d[0, :pads] = 0
    position_ids = (mask_2d.cumsum(-1) - 1).masked_fill(mask_2d == 0, 1)  # what generate() passes
    mask = build_mask(layer, x, mask_2d, position_ids, implementation)
    assert mask.dtype == (torch.bool if implementation == "sdpa" else torch.float64)
    out, weights = layer(x, attention_mask=mask, position_ids=position_ids)
    assert torch.isfinite(out).all()
    alone, _ = layer(x[:1, pads:], position_ids=positions_for(1, length - pads))
    assert (out[0, pads:] - alone[0]).abs().max() <= 1e-12
    real = mask_2d.bool()
    assert (out * real[..., None] - oracle(layer, x, position_ids, real=real)).abs().max() <= 1e-10
    if implementation == "eager":  # eager returns the joint softmax weights; pads get none
        assert weights.shape == (2, 4, length, length)
        assert weights[0, :, pads:, :pads].abs().max() == 0
        assert (weights[:, :, pads:].sum(-1) - 1).abs().max() <= 1e-12


def test_packed_sequences_equal_separate_rows():
    """Restarting position ids with the block-diagonal mask transformers builds for packed rows."""
    layer = make_layer(8, 2)
    x = inputs(1, 30)
    position_ids = torch.cat([torch.arange(13), torch.arange(17)])[None]
    mask = build_mask(layer, x, None, position_ids, "sdpa")
    assert mask is not None
    out, _ = layer(x, attention_mask=mask, position_ids=position_ids)
    first, _ = layer(x[:, :13], position_ids=positions_for(1, 13))
    second, _ = layer(x[:, 13:], position_ids=positions_for(1, 17))
    assert (out - torch.cat([first, second], dim=1)).abs().max() <= 1e-12


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_temperature(path):
    original, length = 16, 40
    layer = use_path(make_layer(8, 2, original=original), path)
    x = inputs(2, length)
    position_ids = positions_for(2, length)
    out, _ = layer(x, position_ids=position_ids)
    tau = (0.1 * math.log(length / original) + 1.0) ** 2
    assert (out - oracle(layer, x, position_ids, temperature=tau)).abs().max() <= 1e-10
    assert (out - oracle(layer, x, position_ids, temperature=1.0)).abs().max() > 1e-3
    # The eager weights are the softmax of the logits times tau: log-ratios scale by tau.
    layer.config._attn_implementation = "eager"
    _, weights = layer(x, position_ids=position_ids)
    _, untempered = make_and_copy(layer, original=None)(x, position_ids=position_ids)
    row, keys = length - 1, slice(0, length)
    log_ratio = torch.log(weights[..., row, keys]) - torch.log(weights[..., row, :1])
    log_ratio_plain = torch.log(untempered[..., row, keys]) - torch.log(untempered[..., row, :1])
    assert (log_ratio - tau * log_ratio_plain).abs().max() <= 1e-10


def make_and_copy(layer, original):
    copy = make_layer(layer.config.chunk_size, layer.config.local_size, original=original)
    copy.load_state_dict(layer.state_dict())
    copy.config._attn_implementation = layer.config._attn_implementation
    return copy


def test_no_temperature_up_to_original_length():
    for length in (10, 16):
        x = inputs(1, length)
        with_original = make_layer(8, 2, original=16)
        without = make_and_copy(with_original, original=None)
        assert torch.equal(with_original(x)[0], without(x)[0])


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_causality(path):
    layer = use_path(make_layer(8, 2), path)
    x = inputs(1, 40)
    perturbed = x.clone()
    perturbed[:, 17] += 1.0
    out, _ = layer(x)
    out_perturbed, _ = layer(perturbed)
    assert torch.equal(out[:, :17], out_perturbed[:, :17])
    assert (out[:, 17:] - out_perturbed[:, 17:]).abs().amin(-1).min() > 0


def loss_and_grads(layer, x, real, **kwargs):
    """Outputs of real rows and the gradients of a weighted sum of them (pad rows' outputs are ignored, as a loss
    with label -100 ignores them; the two paths fill those fully masked rows differently, both finite)."""
    x = x.clone().requires_grad_(True)
    out, _ = layer(x, **kwargs)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out) * real[..., None]
    (out * weight).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return out.detach() * real[..., None], grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_path_equals_reference_with_gradients(dtype, padded):
    layer = make_layer(24, 6, dtype=dtype)
    x = inputs(2, 70, dtype=dtype)
    real = torch.ones(2, 70, dtype=torch.bool)
    kwargs = {"position_ids": positions_for(2, 70)}
    if padded:
        real[1, :9] = False
        kwargs["position_ids"] = (real.cumsum(-1) - 1).masked_fill(~real, 1)
        kwargs["attention_mask"] = build_mask(layer, x, real.long(), kwargs["position_ids"], "sdpa")
    results = {}
    for path in ("reference", "fast"):
        results[path] = loss_and_grads(use_path(layer, path, rows_per_tile=7), x, real, **kwargs)
    (out_ref, grads_ref), (out_fast, grads_fast) = results["reference"], results["fast"]
    assert torch.isfinite(out_fast).all()
    if dtype == torch.float64:
        assert (out_fast - out_ref).abs().max() <= 1e-10
        for grad_ref, grad_fast in zip(grads_ref, grads_fast):
            assert (grad_fast - grad_ref).abs().max() <= 1e-10
    else:
        # fp32 sanity (exactness is the float64 check above): outputs elementwise relative to their scale;
        # gradients are sums over all 140 tokens accumulated in different orders (the flash backward works in fp32
        # blocks), so each path lies up to ~1.5e-5 (relative) from the float64 gradient; compare in norm.
        assert (out_fast - out_ref).abs().max() <= 1e-5 * out_ref.abs().max()
        for grad_ref, grad_fast in zip(grads_ref, grads_fast):
            assert (grad_fast - grad_ref).norm() <= 5e-5 * grad_ref.norm()


def test_fast_path_float_mask_equals_bool_mask():
    """The eager (additive) mask and the sdpa (bool) mask give the same fast-path result."""
    layer = make_layer(24, 6)
    x = inputs(2, 50)
    mask_2d = torch.ones(2, 50, dtype=torch.long)
    mask_2d[0, :5] = 0
    position_ids = (mask_2d.cumsum(-1) - 1).masked_fill(mask_2d == 0, 1)
    bool_mask = build_mask(layer, x, mask_2d, position_ids, "sdpa")
    float_mask = build_mask(layer, x, mask_2d, position_ids, "eager")
    generator = torch.Generator().manual_seed(3)
    queries = tuple(torch.randn(2, 4, 50, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    key, value = (torch.randn(2, 2, 50, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    row = slice(1, 2)  # the unpadded row has offset 0 in slot space
    sub = tuple(q[row] for q in queries)
    with_bool = dual_chunk_fast_attention(sub, key[row], value[row], bool_mask[row], 0, 0, 18, 0.3, rows_per_tile=7)
    with_float = dual_chunk_fast_attention(sub, key[row], value[row], float_mask[row], 0, 0, 18, 0.3, rows_per_tile=7)
    without = dual_chunk_fast_attention(sub, key[row], value[row], None, 0, 0, 18, 0.3, rows_per_tile=7)
    assert (with_bool - with_float).abs().max() <= 1e-12
    assert (with_bool - without).abs().max() <= 1e-12


def test_long_inputs_take_the_fast_path(monkeypatch):
    layer = make_layer(64, 8, dtype=torch.float32)
    calls = []
    original = dca.dual_chunk_fast_attention
    monkeypatch.setattr(dca, "dual_chunk_fast_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    layer(inputs(1, layer.fast_path_min_tokens, dtype=torch.float32))
    assert calls == [1]
    layer(inputs(1, 16, dtype=torch.float32))
    assert calls == [1]


def test_past_key_values_keyword_is_deprecated_alias():
    layer = make_layer(8, 2)
    cache = DynamicCache()
    layer(inputs(1, 5), past_key_values=cache)
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_bfloat16_sanity(path):
    """bf16 runs only need to be finite and close to fp32 in norm (attention-math §7)."""
    x = inputs(2, 70, dtype=torch.float32)
    layer32 = use_path(make_layer(24, 6, dtype=torch.float32, original=16), path, rows_per_tile=7)
    layer16 = use_path(make_layer(24, 6, dtype=torch.bfloat16, original=16), path, rows_per_tile=7)
    out32, _ = layer32(x)
    out16, _ = layer16(x.bfloat16())
    assert torch.isfinite(out16).all()
    assert (out16.float() - out32).norm() <= 5e-2 * out32.norm()
