"""Lightning Attention-2, the linear-attention layer of MiniMax-01 (attention-math.md §4).

Per head, with a fixed decay `λ = exp(-s)`, the layer computes

    S_t = λ S_{t-1} + k_tᵀ v_t,        o_t = q_t S_t

over SiLU-activated q, k, v: no softmax, no `1/√d`, no RoPE. A forward runs the *block algorithm*: inside a block of
`m` tokens the masked left product `((Q Kᵀ) ⊙ M) V`, across blocks the carried state `S`. Every decay factor is
`exp(-s·Δ)` with `Δ ≥ 0`, so nothing overflows however long the sequence, and the state is accumulated in fp32.

The pure math lives in module-level functions (`lightning_slopes`, `lightning_decay_rates`, `lightning_decay_tables`,
`lightning_attention_blockwise`, `lightning_attention_step`) so that the tests can run them in float64 against the
plain formulas. The module owns the projections, the joint RMSNorm, the output gate and the recurrent-state cache
protocol of `recurrent_cache.py`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import find_packed_sequence_indices
from transformers.utils.deprecation import deprecate_kwarg

from .layers import DecoderOnlyRMSNorm


# ----------------------------------------------------------------------------------------------------- decay rates
def _alibi_powers(num_heads: int) -> list[float]:
    """`2^(-8(h+1)/n)` for `h = 0 … n-1`: the ALiBi slopes of a power-of-two head count."""
    return [2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)]


def lightning_slopes(num_heads: int) -> torch.Tensor:
    """Base decay slopes `[num_heads]` (float64), ALiBi rule including head counts that are not a power of 2.

    A non-power-of-2 count `H` takes the `P = 2^⌊log₂ H⌋` slopes of `P` heads, then every other slope of `2P` heads
    (those that interleave with the first `P`), as vLLM and the OpenNLPLab kernels do. transformers' MiniMax uses
    `pow2(H)` for every `H`; both agree for powers of 2.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    closest_power = 2 ** math.floor(math.log2(num_heads))
    slopes = _alibi_powers(closest_power)
    if closest_power != num_heads:
        slopes += _alibi_powers(2 * closest_power)[0::2][: num_heads - closest_power]
    return torch.tensor(slopes, dtype=torch.float64)


def lightning_layer_factor(layer_idx: int, num_layers: int) -> float:
    """MiniMax's per-layer slope factor `1 - l/(N-1+1e-5) + 1e-5` (global layer index, softmax layers counted).

    Early layers decay fast (local), the last layer hardly decays (an almost plain cumulative sum). The `1e-5` terms
    keep it finite and positive for `N = 1` and for the last layer.
    """
    return 1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5


def lightning_decay_rates(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Decay rates `s_{l,h}` `[num_heads]` (float64); the per-token decay is `λ = exp(-s)`."""
    return lightning_slopes(num_heads) * lightning_layer_factor(layer_idx, num_layers)


def lightning_decay_tables(
    decay_rates: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay tables of one block, in the dtype of `decay_rates [H]`.

    Returns `query_decay [H, bs] = λ^(a+1)`, `key_decay [H, bs] = λ^(bs-1-b)` and `diagonal_decay [H, bs, bs] =
    λ^(a-b)` for `b ≤ a`, exactly 0 above the diagonal. A shorter block of `m` tokens uses the first `m` query
    entries, the LAST `m` key entries (`λ^(m-1…0)`) and the leading `m × m` corner (§4.4).
    """
    index = torch.arange(block_size, dtype=decay_rates.dtype, device=decay_rates.device)
    rates = decay_rates[:, None]
    query_decay = torch.exp(-rates * (index + 1))
    key_decay = torch.exp(-rates * (block_size - 1 - index))
    distance = index[:, None] - index[None, :]
    # Exponents are clamped to >= 0 before exp; the upper triangle is then set to an exact 0 (never exp(+x)).
    diagonal_decay = torch.exp(-rates[:, :, None] * distance.clamp(min=0))
    diagonal_decay = torch.where(distance >= 0, diagonal_decay, torch.zeros_like(diagonal_decay))
    return query_decay, key_decay, diagonal_decay


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and products are fp32 for every input dtype (float64 stays float64, for the oracles)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -------------------------------------------------------------------------------------------------------- the core
def _lightning_block(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: torch.Tensor,
    decay_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    segment_ids: torch.Tensor | None,
    state_segment: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of `m` tokens: `(out [B,H,m,d], new state)`.

    With packed sequences (`segment_ids [B|1, m]`, `state_segment [B|1]` = the sequence that owns `state`), the
    intra mask is zeroed across sequences, only tokens of the owning sequence read `state`, and the new state is
    built from the block's last sequence alone, keeping the old one only if that sequence owns it (§4.5).
    """
    query_decay, key_decay, diagonal_decay = decay_tables
    length = query.shape[2]
    query_decay = query_decay[:, :length, None]  # λ^(a+1)
    key_decay = key_decay[:, -length:, None]  # λ^(m-1-b)
    intra_decay = diagonal_decay[:, :length, :length]  # λ^(a-b), b ≤ a
    carry_decay = query_decay[:, -1:, :]  # λ^m
    decayed_query = query * query_decay
    decayed_key = key * key_decay
    if segment_ids is not None:
        segments = segment_ids[:, None, :, None]  # [B, 1, m, 1]
        last_segment = segments[:, :, -1:, :]
        intra_decay = intra_decay * (segments == segments.transpose(-1, -2))
        decayed_query = decayed_query * (segments == state_segment[:, None, None, None])
        decayed_key = decayed_key * (segments == last_segment)
        carry_decay = carry_decay * (last_segment == state_segment[:, None, None, None])
    intra = torch.matmul(torch.matmul(query, key.transpose(-1, -2)) * intra_decay, value)
    inter = torch.matmul(decayed_query, state)
    state = state * carry_decay + torch.matmul(decayed_key.transpose(-1, -2), value)
    return intra + inter, state


def _lightning_full_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: torch.Tensor,
    decay_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` whole blocks of `bs` tokens at once (`T = n·bs`, one sequence per row): `(out [B,H,T,d], final state)`.

    The same algebra as `_lightning_block`, batched over blocks: every intra product and every block's state
    contribution `(K_n ⊙ λ^(bs-1-b))ᵀ V_n` is one batched matmul; only the carry `S_(n+1) = λ^bs S_n + KV_n` runs as
    a loop, one fused multiply-add on `[B, H, d, d]` per block. (A closed form over blocks costs `n²·d²` per head,
    and factoring it through `λ^(-bs·j)` would overflow, §4.6.)
    """
    block = block_size
    query_decay = decay_tables[0][:, :block]  # λ^(a+1)
    key_decay = decay_tables[1][:, -block:]  # λ^(bs-1-b)
    diagonal_decay = decay_tables[2][:, :block, :block]  # λ^(a-b), exact 0 for b > a
    batch, num_heads, length, head_dim = query.shape
    num_blocks = length // block
    blocks = (batch, num_heads, num_blocks, block)
    query = query.reshape(*blocks, head_dim)  # views: T splits into (n, bs) without a copy
    key = key.reshape(*blocks, head_dim)
    value = value.reshape(*blocks, value.shape[-1])

    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(diagonal_decay[:, None])
    block_states = torch.matmul((key * key_decay[:, None, :, None]).transpose(-1, -2), value)  # [B, H, n, d, d]

    carry = query_decay[:, -1, None, None]  # λ^bs
    entering = []
    for index in range(num_blocks):
        entering.append(state)
        state = torch.addcmul(block_states[:, :, index], state, carry)
    entering = torch.stack(entering, dim=2)  # the state before each block
    inter = torch.matmul(query * query_decay[:, None, :, None], entering)  # λ^(a+1) S_n
    # intra + inter in one GEMM that accumulates into `inter` (the blocks folded into one batch dimension).
    out = torch.baddbmm(inter.flatten(0, 2), scores.flatten(0, 2), value.flatten(0, 2))
    return out.reshape(batch, num_heads, length, -1), state


def _lightning_per_token_states(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    state: torch.Tensor,
    decay_rates: torch.Tensor,
    segment_ids: torch.Tensor | None,
    state_segment: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A short run of `n` tokens that also returns the state after each one: `(out [B,H,n,d], states [B,H,n,d,d])`.

    `S_t = λ^(t+1) S + Σ_{j≤t} λ^(t-j) k_jᵀ v_j` and `o_t = q_t S_t`, in closed form (no token loop). Used for the
    few trailing tokens whose states the cache records for a later rollback (assisted decoding).
    """
    length = query.shape[2]
    index = torch.arange(length, dtype=decay_rates.dtype, device=decay_rates.device)
    rates = decay_rates[:, None]
    state_decay = torch.exp(-rates * (index + 1))[:, :, None]  # [H, n, 1]
    distance = index[:, None] - index[None, :]
    token_decay = torch.exp(-rates[:, :, None] * distance.clamp(min=0))
    token_decay = torch.where(distance >= 0, token_decay, torch.zeros_like(token_decay))  # [H, n, n]
    if segment_ids is not None:
        segments = segment_ids[:, None, :, None]
        token_decay = token_decay * (segments == segments.transpose(-1, -2))
        state_decay = state_decay * (segments == state_segment[:, None, None, None])
    states = state_decay[..., None] * state[:, :, None] + torch.einsum(
        "bhtj,bhjd,bhje->bhtde", token_decay.expand(query.shape[0], -1, -1, -1), key, value
    )
    return torch.einsum("bhtd,bhtde->bhte", query, states), states


def lightning_attention_blockwise(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    decay_rates: torch.Tensor,
    block_size: int,
    initial_state: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    keep_states: int = 0,
    decay_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Lightning Attention-2 core over `T` tokens (attention-math §4.3–4.5).

    Args:
        query, key, value: `[B, H, T, d]`, already activated and masked.
        decay_rates: `[H]`, the rates `s` (`λ = exp(-s)`).
        block_size: block length; any `T` works (the last block may be shorter) and the result does not depend on it.
        initial_state: `[B, H, d, d]` state before the first token (zero when `None`); it belongs to the first
            sequence of each row.
        segment_ids: `[B|1, T]` non-decreasing sequence ids of packed rows (`find_packed_sequence_indices`); the state
            restarts at 0 at each new id. `None` for one sequence per row.
        keep_states: also return the states after each of the last `keep_states` tokens.
        decay_tables: precomputed `lightning_decay_tables(decay_rates, block_size)`; computed here when `None`.

    Returns:
        `(out [B, H, T, d] in the input dtype, final state [B, H, d, d] in fp32 (float64 for float64 inputs),
        states [B, H, keep_states, d, d] or None)`.
    """
    batch, num_heads, length, head_dim = query.shape
    input_dtype, dtype = query.dtype, _accumulation_dtype(query.dtype)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    decay_rates = decay_rates.to(device=query.device, dtype=dtype)
    if decay_tables is None:
        decay_tables = lightning_decay_tables(decay_rates, block_size)
    decay_tables = tuple(table.to(device=query.device, dtype=dtype) for table in decay_tables)
    if initial_state is None:
        state = query.new_zeros(batch, num_heads, head_dim, value.shape[-1])
    else:
        state = initial_state.to(dtype)
    # The incoming state belongs to each row's first sequence.
    state_segment = segment_ids[:, 0] if segment_ids is not None else None

    num_recorded = min(keep_states, length)
    blocked_length = length - num_recorded
    outputs = []
    done = 0
    if segment_ids is None and blocked_length >= block_size:
        # One sequence per row: all whole blocks in one batched pass; a shorter last block goes through the loop.
        done = blocked_length - blocked_length % block_size
        out, state = _lightning_full_blocks(
            query[:, :, :done], key[:, :, :done], value[:, :, :done], state, decay_tables, block_size
        )
        outputs.append(out)
    for start in range(done, blocked_length, block_size):
        end = min(start + block_size, blocked_length)
        block_segments = segment_ids[:, start:end] if segment_ids is not None else None
        out, state = _lightning_block(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            state,
            decay_tables,
            block_segments,
            state_segment,
        )
        outputs.append(out)
        if block_segments is not None:
            state_segment = block_segments[:, -1]

    states = None
    if num_recorded > 0:
        tail_segments = segment_ids[:, blocked_length:] if segment_ids is not None else None
        out, states = _lightning_per_token_states(
            query[:, :, blocked_length:],
            key[:, :, blocked_length:],
            value[:, :, blocked_length:],
            state,
            decay_rates,
            tail_segments,
            state_segment,
        )
        outputs.append(out)
        state = states[:, :, -1]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.to(input_dtype), state, states


def lightning_attention_step(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decay_rates: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token (`[B, H, 1, d]`): `S ← λ S + kᵀ v`, `o = q S`.

    Returns `(out, new_state)`: the output in the input dtype, the state in fp32 (float64 for float64 inputs).
    """
    dtype = _accumulation_dtype(query.dtype)
    decay = torch.exp(-decay_rates.to(device=query.device, dtype=dtype))[:, None, None]
    key, value = key.to(dtype), value.to(dtype)
    state = decay * state.to(dtype) + torch.matmul(key.transpose(-1, -2), value)
    return torch.matmul(query.to(dtype), state).to(query.dtype), state


# --------------------------------------------------------------------------------------------------------- module
_BUFFER_NAMES = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
# Long prefills without packed sequences run the layer over runs of this many tokens (see `_attend_in_chunks`).
_PREFILL_CHUNK = 2048


class DecoderOnlyLightningAttention(nn.Module):
    """MiniMax-01 Lightning attention layer (attention-math §4.1).

    `qkv_proj` is fused in MiniMax's per-head layout `[q_h | k_h | v_h]`, so weights copy one to one from
    transformers' `MiniMaxLightningAttention`. All `num_attention_heads` heads are used for q, k and v.
    The recurrent state lives in a `linear_attention` cache layer (`recurrent_cache.DecoderOnlyLinearAttentionLayer`).
    """

    slope_rate: torch.Tensor
    query_decay: torch.Tensor
    key_decay: torch.Tensor
    diagonal_decay: torch.Tensor

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.block_size = config.block_size
        inner_size = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * inner_size, bias=False)
        self.output_gate = nn.Linear(config.hidden_size, inner_size, bias=False)
        self.norm = DecoderOnlyRMSNorm(inner_size, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(inner_size, config.hidden_size, bias=False)
        # Non-persistent, so checkpoints do not depend on `block_size`; `_init_weights` refills them (`init_buffers`).
        for name, value in self.init_buffers().items():
            self.register_buffer(name, value, persistent=False)
        # Tables for accumulation dtypes the fp32 buffers cannot serve, by (dtype, device); they depend on the
        # config alone, so they never go stale.
        self._decay_cache: dict[tuple[torch.dtype, torch.device], tuple] = {}

    def _buffer_values(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """`(decay rates [H], query_decay [H, bs], key_decay [H, bs], diagonal_decay [H, bs, bs])`, from float64."""
        decay_rates = lightning_decay_rates(self.num_heads, self.layer_idx, self.config.num_hidden_layers)
        tables = lightning_decay_tables(decay_rates, self.block_size)
        return tuple(value.to(dtype) for value in (decay_rates, *tables))

    def init_buffers(self) -> dict[str, torch.Tensor]:
        """Name -> value of every buffer built in `__init__`. The model's `_init_weights` copies them back with
        `init.copy_`: `from_pretrained` does not load non-persistent buffers and would otherwise leave garbage."""
        return dict(zip(_BUFFER_NAMES, self._buffer_values()))

    def _decay(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Decay rates and tables in the accumulation dtype. The fp32 buffers serve fp32 accumulation; float64, or
        buffers that a `.to(...)` has cast (bf16 rounds them, float64 only widens fp32 values), get tables recomputed
        from float64 once per (dtype, device) and cached."""
        if dtype == torch.float32 and self.slope_rate.dtype == torch.float32:
            return self.slope_rate, (self.query_decay, self.key_decay, self.diagonal_decay)
        key = (dtype, torch.device(device))
        if key not in self._decay_cache:
            decay_rates, *tables = (value.to(device) for value in self._buffer_values(dtype))
            self._decay_cache[key] = decay_rates, tuple(tables)
        return self._decay_cache[key]

    def _attend(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None,
        state: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        num_recorded: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The layer on one run of tokens: `(out [B, T, D], final state, recorded states or None)`."""
        batch, length, _ = hidden_states.shape
        qkv = F.silu(self.qkv_proj(hidden_states))
        if token_mask is not None:
            qkv = qkv * token_mask[:, :, None].to(qkv.dtype)
        # One copy to `[B, H, T, 3d]` so that q, k and v (and their blocks) are batched-matmul operands without copies.
        qkv = qkv.view(batch, length, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        if length > 1:
            qkv = qkv.contiguous()
        query, key, value = qkv.split(self.head_dim, dim=-1)
        dtype = _accumulation_dtype(hidden_states.dtype)
        decay_rates, decay_tables = self._decay(dtype, hidden_states.device)

        if length == 1 and state is not None:
            out, final_state = lightning_attention_step(query, key, value, decay_rates, state)
            recorded = final_state[:, :, None] if num_recorded else None
        else:
            out, final_state, recorded = lightning_attention_blockwise(
                query,
                key,
                value,
                decay_rates,
                self.block_size,
                initial_state=state,
                segment_ids=segment_ids,
                keep_states=num_recorded,
                decay_tables=decay_tables,
            )
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim).to(hidden_states.dtype)
        out = self.norm(out)
        out = torch.sigmoid(self.output_gate(hidden_states)) * out
        return self.out_proj(out), final_state, recorded

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")  # the old name of transformers' linear-attention layers
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """`hidden_states [B, T, D] -> (out [B, T, D], None)`.

        `attention_mask` is the 2-D padding mask of the current tokens (`create_recurrent_attention_mask`, 1 = real
        token) or `None`; padded tokens get zero q, k, v, so they leave the state untouched. `position_ids` that
        restart inside a row mark packed sequences; the state restarts at each of them. `position_embeddings` is
        unused (no RoPE in lightning layers).
        """
        length = hidden_states.shape[1]
        token_mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(
                    f"DecoderOnlyLightningAttention: `attention_mask` must be the 2-D padding mask [batch, tokens] "
                    f"(create_recurrent_attention_mask), got shape {tuple(attention_mask.shape)}."
                )
            token_mask = attention_mask[:, -length:]

        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        if state is not None and torch.is_grad_enabled():
            state = state.clone()  # the cache overwrites its state in place below; autograd may still need this one
        states_to_keep = cache.get_recurrent_states_to_keep(self.layer_idx) if cache is not None else 0
        # A rollback of r <= keep tokens after a forward of `keep + 1` verified tokens needs the states after the
        # last `keep + 1` tokens (transformers-v5.md §8.3).
        num_recorded = min(length, states_to_keep + 1) if states_to_keep else 0
        segment_ids = None
        if position_ids is not None and not (length == 1 and state is not None):
            segment_ids = find_packed_sequence_indices(position_ids)

        if segment_ids is not None or length <= _PREFILL_CHUNK:
            out, final_state, recorded = self._attend(hidden_states, token_mask, state, segment_ids, num_recorded)
        else:
            out, final_state, recorded = self._attend_in_chunks(hidden_states, token_mask, state, num_recorded)
        if cache is not None:
            new_states = list(recorded.unbind(2)) if num_recorded else final_state
            cache.update_recurrent_state(new_states, self.layer_idx, num_new_tokens=length)
        return out, None

    def _attend_in_chunks(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None, state: torch.Tensor | None, num_recorded: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`_attend` over runs of `_PREFILL_CHUNK` tokens, carrying the state: the same result (the layer is causal and
        per-token outside the core), but every intermediate stays small. Tensors above glibc's 32 MB mmap threshold
        are fresh pages on every call, and their page faults made long prefills grow faster than linearly."""
        length = hidden_states.shape[1]
        outputs, recorded = [], []
        for start in range(0, length, _PREFILL_CHUNK):
            end = min(start + _PREFILL_CHUNK, length)
            keep = max(0, min(end - start, num_recorded - (length - end)))  # recorded tokens inside this chunk
            mask = token_mask[:, start:end] if token_mask is not None else None
            out, state, states = self._attend(hidden_states[:, start:end], mask, state, None, keep)
            outputs.append(out)
            if states is not None:
                recorded.append(states)
        return torch.cat(outputs, dim=1), state, torch.cat(recorded, dim=2) if recorded else None


__all__ = [
    "DecoderOnlyLightningAttention",
    "lightning_attention_blockwise",
    "lightning_attention_step",
    "lightning_decay_rates",
    "lightning_decay_tables",
    "lightning_layer_factor",
    "lightning_slopes",
]
