"""Dual Chunk Attention (ChunkLlama / Qwen2.5-1M, code convention of vLLM / SGLang / ChunkLlama).

Math: attention-math.md §5. With `cs = chunk_size`, `w = local_size` and the partition length `c = cs - w`, token
`i` lies in chunk `n_i = p_i // c` at offset `r_i = p_i % c`. Keys are rotated (and cached) at `r_j`; a query is
rotated at one of three positions depending on the key's chunk:

    intra (n_j == n_i):      r_i                     exact distances
    succ  (n_j == n_i - 1):  min(r_i + c, cs)        exact while r_i <= w, clamped after
    inter (n_j <= n_i - 2):  min(2c - 1, cs)

and ONE softmax covers all allowed keys of all three parts. Every relative distance lies in `[0, cs]`.

Two exact implementations live here:

- `dual_chunk_reference_attention`: per (query, key) pair the score of its part is selected from the three score
  matrices; one fp32 softmax per row. Any mask, any positions; returns the weights; also the decode path.
- `dual_chunk_fast_attention`: per tile of query rows (inside one chunk) the keys split into contiguous slot ranges,
  one per part; each range is one call of torch's CPU flash kernel, which returns `(out, logsumexp)`, and the partial
  results are merged by their log-sum-exp. No `[T, T]` matrix is built; the cost is that of causal attention. The
  backward pass of a joint softmax restricted to one key range is the flash backward with the *merged* output and
  log-sum-exp, so gradients are exact (ChunkLlama and vLLM detach the merge weights instead, which is wrong for
  training). Without the private CPU kernel the same plan runs in plain torch (autograd through the merge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.deprecation import deprecate_kwarg

from .gqa_attention import DecoderOnlySoftmaxAttentionBase
from .layers import apply_rotary, compute_default_rope_parameters, repeat_kv, rope_cos_sin, rotate_half


# Private CPU kernels returning / consuming the log-sum-exp (guarded: the fallback is plain torch).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

INTRA, SUCC, INTER = 0, 1, 2


# --------------------------------------------------------------------------------------------------------------------
# Positions and temperature
# --------------------------------------------------------------------------------------------------------------------


def dual_chunk_query_positions(
    positions: torch.Tensor, chunk_len: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three rotation positions of each query (intra, succ, inter) for absolute `positions`."""
    intra = torch.remainder(positions, chunk_len)
    succ = torch.clamp(intra + chunk_len, max=chunk_size)
    inter = torch.full_like(positions, min(2 * chunk_len - 1, chunk_size))
    return intra, succ, inter


def dual_chunk_parts(query_positions: torch.Tensor, key_positions: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Part of every pair `[B, q, k]`: 0 intra, 1 succ, 2 inter (a future key, masked anyway, counts as intra)."""
    query_chunks = torch.div(query_positions, chunk_len, rounding_mode="floor")
    key_chunks = torch.div(key_positions, chunk_len, rounding_mode="floor")
    return (query_chunks[:, :, None] - key_chunks[:, None, :]).clamp(min=INTRA, max=INTER)


def dual_chunk_temperature(position_ids: torch.Tensor, original_max_position_embeddings: int | None) -> torch.Tensor:
    """Qwen's logit factor `tau = sf(L)^2`, `sf(L) = max(1, 0.1 ln(L / L_orig) + 1)`, `L = 1 + max position` per row
    (attention-math §5.3). Returns `[B]` in float64 (cast by the caller); all ones when no `L_orig` is set."""
    length = position_ids.max(dim=-1).values.to(torch.float64) + 1
    if not original_max_position_embeddings:
        return torch.ones_like(length)
    factor = torch.clamp(0.1 * torch.log(length / original_max_position_embeddings) + 1.0, min=1.0)
    return factor * factor


# --------------------------------------------------------------------------------------------------------------------
# Reference path: selected scores, one softmax
# --------------------------------------------------------------------------------------------------------------------


def _allowed_and_bias(
    attention_mask: torch.Tensor | None,
    rows: slice,
    num_keys: int,
    past_len: int,
    score_dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal slot mask for query rows `rows` (bottom-right aligned: new row t sits at slot past_len + t), and the
    caller's mask folded in: a bool `[B, 1, r, k]` (sdpa) is and-ed, an additive float mask (eager) is returned."""
    query_slots = torch.arange(rows.start + past_len, rows.stop + past_len, device=device)
    allowed = (torch.arange(num_keys, device=device)[None, :] <= query_slots[:, None])[None, None]
    if attention_mask is None:
        return allowed, None
    mask = attention_mask[:, :, rows, :num_keys]
    if mask.dtype == torch.bool:
        return allowed & mask, None
    return allowed, mask.to(score_dtype)


def dual_chunk_reference_attention(
    queries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_len: int,
    chunk_len: int,
    scaling: float,
    num_key_value_groups: int,
    dropout: float = 0.0,
    training: bool = False,
    return_weights: bool = False,
    rows_per_tile: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact DCA (attention-math §5.4, form 1): for every pair the score of its part, one softmax per row.

    `queries` are the rotated (intra, succ, inter) queries `[B, H, T, d]` (temperature folded in), `key`/`value`
    `[B, K, S, d]` with keys rotated at `p mod c`, positions `[B, T]` / `[B, S]`. Query rows are processed in tiles of
    `rows_per_tile` (all at once when returning weights), so memory is `O(tile * S)`. The query heads of a kv head
    are stacked into one matrix product instead of copying the keys and values `H/K` times (`repeat_kv`), which
    keeps decoding over a long cache cheap. Returns `(out [B, H, T, d], weights [B, H, T, S] | None)`.
    """
    batch, num_heads, num_queries, head_dim = queries[0].shape
    num_keys = key.shape[2]
    score_dtype = torch.promote_types(queries[0].dtype, torch.float32)
    tile = num_queries if return_weights or not rows_per_tile else rows_per_tile
    outputs, weights = [], []
    for start in range(0, num_queries, tile):
        rows = slice(start, min(start + tile, num_queries))
        num_rows = rows.stop - rows.start
        parts = dual_chunk_parts(query_positions[:, rows], key_positions, chunk_len)[:, None]
        # The three rotations in one product, so the keys are read once (decoding is bound by reading the cache).
        stacked = torch.cat([_group_heads(q[:, :, rows], num_key_value_groups) for q in queries], dim=2)
        intra, succ, inter = torch.matmul(stacked, key.transpose(2, 3)).chunk(3, dim=2)
        intra, succ, inter = (s.reshape(batch, num_heads, num_rows, num_keys) for s in (intra, succ, inter))
        scores = torch.where(parts == INTRA, intra, torch.where(parts == SUCC, succ, inter)).to(score_dtype) * scaling
        allowed, bias = _allowed_and_bias(attention_mask, rows, num_keys, past_len, score_dtype, key.device)
        if bias is not None:
            scores = scores + bias
        scores = scores.masked_fill(~allowed, torch.finfo(score_dtype).min)
        probs = nn.functional.softmax(scores, dim=-1, dtype=score_dtype).to(value.dtype)
        probs = nn.functional.dropout(probs, p=dropout, training=training)
        out = torch.matmul(_group_heads(probs, num_key_value_groups), value)
        outputs.append(out.view(batch, num_heads, num_rows, head_dim))
        if return_weights:
            weights.append(probs)
    if return_weights and len(weights) == 1:
        # One tile (always the case when returning weights): return the very tensor the output was computed from, so
        # gradients reach it (`torch.cat` of one tensor is a copy outside the graph of the output).
        return torch.cat(outputs, dim=2), weights[0]
    return torch.cat(outputs, dim=2), (torch.cat(weights, dim=2) if return_weights else None)


def _group_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, H, T, X] -> [B, K, G*T, X]`: the G query heads served by kv head j (heads jG ... jG+G-1, `repeat_kv`
    order) stacked along the rows."""
    batch, num_heads, num_rows, width = states.shape
    return states.reshape(batch, num_heads // groups, groups * num_rows, width)


# --------------------------------------------------------------------------------------------------------------------
# Fast path: per query tile, one attention call per part, log-sum-exp merge
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    query: int  # INTRA, SUCC or INTER: which rotated query attends this key range
    key_start: int
    key_end: int
    causal: bool  # the square diagonal block: row t sees keys up to its own slot


@dataclass(frozen=True)
class _Tile:
    row_start: int
    row_end: int
    parts: tuple[_Part, ...]


def dual_chunk_plan(
    num_queries: int, past_len: int, position_offset: int, chunk_len: int, rows_per_tile: int
) -> list[_Tile]:
    """Split the query rows into tiles inside one chunk, and each tile's keys into contiguous slot ranges per part.

    Positions must be contiguous: slot `s` holds position `s + position_offset`; the new rows occupy slots
    `past_len ... past_len + num_queries - 1`. Keys after a tile's last row are never visited (causality; unused
    static-cache slots included). The own chunk is split at the tile's first row into a full block and a causal
    square, so top-left aligned causal kernels are also right for chunked prefill.
    """

    def slot(position: int) -> int:
        return max(position - position_offset, 0)

    tiles, row = [], 0
    while row < num_queries:
        first_slot = past_len + row
        chunk = (first_slot + position_offset) // chunk_len
        chunk_end_row = (chunk + 1) * chunk_len - position_offset - past_len
        row_end = min(num_queries, row + rows_per_tile, chunk_end_row)
        ranges = (
            (INTER, 0, slot((chunk - 1) * chunk_len), False),
            (SUCC, slot((chunk - 1) * chunk_len), slot(chunk * chunk_len), False),
            (INTRA, slot(chunk * chunk_len), first_slot, False),
            (INTRA, first_slot, past_len + row_end, True),
        )
        parts = tuple(_Part(q, start, end, causal) for q, start, end, causal in ranges if end > start)
        tiles.append(_Tile(row, row_end, parts))
        row = row_end
    return tiles


def _part_mask(attention_mask: torch.Tensor | None, tile: _Tile, part: _Part, dtype: torch.dtype) -> torch.Tensor | None:
    """The caller's mask for one (tile, part) block as an additive float mask (the flash kernel takes no bool), with
    the causal triangle added on the diagonal block (the kernel cannot combine `is_causal` with a mask). Masked
    entries get the finite dtype minimum, so fully masked rows stay finite."""
    if attention_mask is None:
        return None
    block = attention_mask[:, :, tile.row_start : tile.row_end, part.key_start : part.key_end]
    min_value = torch.finfo(dtype).min
    if block.dtype == torch.bool:
        additive = torch.zeros(block.shape, dtype=dtype, device=block.device).masked_fill(~block, min_value)
    else:
        additive = block.to(dtype).clamp(min=min_value)
    if part.causal:
        size = tile.row_end - tile.row_start
        future = torch.ones(size, size, dtype=torch.bool, device=block.device).triu(1)
        additive = additive.masked_fill(future, min_value)
    return additive.contiguous()


def _merge_partials(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`l = logsumexp_p l_p`, `o = sum_p exp(l_p - l) o_p`, in fp32 (f64 for f64). Differentiable in every input.

    Masked rows carry `l_p` near the dtype minimum (finite), so their weights vanish without NaN."""
    merge_dtype = torch.promote_types(lses[0].dtype, torch.float32)
    lses = [lse.to(merge_dtype) for lse in lses]
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(torch.exp(part_lse - lse)[..., None] * o.to(merge_dtype) for o, part_lse in zip(outputs, lses))
    return out, lse


class _DualChunkJointSoftmax(torch.autograd.Function):
    """Joint softmax over the parts of every tile with torch's CPU flash kernels, forward and backward."""

    @staticmethod
    def forward(ctx, plan, scaling, attention_mask, q_intra, q_succ, q_inter, key, value):
        queries = (q_intra, q_succ, q_inter)
        out = torch.empty_like(q_intra)
        lse = None
        for tile in plan:
            rows = slice(tile.row_start, tile.row_end)
            partial_out, partial_lse = [], []
            for part in tile.parts:
                mask = _part_mask(attention_mask, tile, part, q_intra.dtype)
                keys = slice(part.key_start, part.key_end)
                o, l = _FLASH_CPU(
                    queries[part.query][:, :, rows], key[:, :, keys], value[:, :, keys], 0.0,
                    part.causal and mask is None, attn_mask=mask, scale=scaling,
                )  # fmt: skip
                partial_out.append(o)
                partial_lse.append(l)
            tile_out, tile_lse = _merge_partials(partial_out, partial_lse)
            if lse is None:  # the kernels' log-sum-exp dtype (fp32, f64 for f64) is what their backward expects
                lse = q_intra.new_empty(q_intra.shape[:3], dtype=partial_lse[0].dtype)
            out[:, :, rows] = tile_out.to(out.dtype)
            lse[:, :, rows] = tile_lse.to(lse.dtype)
        ctx.plan, ctx.scaling, ctx.attention_mask = plan, scaling, attention_mask
        ctx.save_for_backward(q_intra, q_succ, q_inter, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_intra, q_succ, q_inter, key, value, out, lse = ctx.saved_tensors
        queries = (q_intra, q_succ, q_inter)
        grad_queries = [torch.zeros_like(q) for q in queries]
        grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
        grad_out = grad_out.contiguous()
        for tile in ctx.plan:
            rows = slice(tile.row_start, tile.row_end)
            for part in tile.parts:
                # With the MERGED output and log-sum-exp, the kernel's P = exp(s - l) and D = rowsum(dO * O) are those
                # of the joint softmax, so this is exactly the joint-softmax gradient restricted to these keys.
                mask = _part_mask(ctx.attention_mask, tile, part, q_intra.dtype)
                keys = slice(part.key_start, part.key_end)
                grad_q, grad_k, grad_v = _FLASH_CPU_BACKWARD(
                    grad_out[:, :, rows], queries[part.query][:, :, rows], key[:, :, keys], value[:, :, keys],
                    out[:, :, rows], lse[:, :, rows], 0.0, part.causal and mask is None, attn_mask=mask,
                    scale=ctx.scaling,
                )  # fmt: skip
                grad_queries[part.query][:, :, rows] += grad_q
                grad_key[:, :, keys] += grad_k
                grad_value[:, :, keys] += grad_v
        return None, None, None, *grad_queries, grad_key, grad_value


def _part_attention_math(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, causal: bool, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `(out, logsumexp)` of one (tile, part) block: the fallback when the CPU flash kernels are missing
    (other devices or torch builds). Autograd differentiates the log-sum-exp too."""
    groups = query.shape[1] // key.shape[1]
    score_dtype = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)).to(score_dtype) * scaling
    if mask is not None:
        scores = scores + mask.to(score_dtype)
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(score_dtype).min)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).to(value.dtype)
    return torch.matmul(probs, repeat_kv(value, groups)), lse


def dual_chunk_fast_attention(
    queries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_len: int,
    position_offset: int,
    chunk_len: int,
    scaling: float,
    rows_per_tile: int = 2048,
    use_flash: bool | None = None,
) -> torch.Tensor:
    """Exact DCA without a `[T, T]` matrix (attention-math §5.4, form 2) for contiguous positions (slot `s` holds
    position `s + position_offset`). Returns `out [B, H, T, d]`.

    `use_flash=None` picks torch's CPU flash kernels when they exist and the tensors are on CPU."""
    num_queries = queries[0].shape[2]
    key, value = key[:, :, : past_len + num_queries], value[:, :, : past_len + num_queries]
    plan = dual_chunk_plan(num_queries, past_len, position_offset, chunk_len, rows_per_tile)
    if use_flash is None:
        use_flash = _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None and key.device.type == "cpu"
    if use_flash:
        return _DualChunkJointSoftmax.apply(plan, scaling, attention_mask, *queries, key, value)
    mask_dtype = torch.promote_types(key.dtype, torch.float32)
    tiles = []
    for tile in plan:
        rows = slice(tile.row_start, tile.row_end)
        partial_out, partial_lse = [], []
        for part in tile.parts:
            keys = slice(part.key_start, part.key_end)
            mask = _part_mask(attention_mask, tile, part, mask_dtype)
            o, l = _part_attention_math(
                queries[part.query][:, :, rows], key[:, :, keys], value[:, :, keys], mask,
                part.causal and mask is None, scaling,
            )  # fmt: skip
            partial_out.append(o)
            partial_lse.append(l)
        tiles.append(_merge_partials(partial_out, partial_lse)[0].to(value.dtype))
    return torch.cat(tiles, dim=2)


def _contiguous_offsets(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_len: int
) -> torch.Tensor | None:
    """Per row, the offset `o` with `position = slot + o` for every real new token (derived from the row's last token,
    like the positions of cached slots, attention-math §5.6), or None when some row breaks it (packed sequences,
    right padding). Left-padded rows qualify: their pads are masked whatever positions they carry."""
    num_queries = position_ids.shape[1]
    slots = torch.arange(past_len, past_len + num_queries, device=position_ids.device)
    offsets = position_ids[:, -1] - (past_len + num_queries - 1)
    matches = position_ids == slots[None, :] + offsets[:, None]
    if attention_mask is not None:
        # A real token attends its own slot; a pad's query row is fully masked.
        diagonal = attention_mask[:, 0, torch.arange(num_queries, device=slots.device), slots]
        real = diagonal if diagonal.dtype == torch.bool else diagonal > torch.finfo(diagonal.dtype).min / 2
        matches = matches | ~real
    return offsets if bool(matches.all()) else None


# --------------------------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------------------------


def _as_4d_mask(attention_mask: torch.Tensor | None, num_queries: int) -> torch.Tensor | None:
    """Accept what `create_causal_mask` returns: None, a 4-D bool/additive mask, or (flash implementations) a 2-D
    padding mask, which becomes a broadcast 4-D bool view (no copy)."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    if attention_mask.dim() == 2:
        batch, num_keys = attention_mask.shape
        return attention_mask.bool()[:, None, None, :].expand(batch, 1, num_queries, num_keys)
    raise ValueError(
        "DecoderOnlyDualChunkAttention: attention_mask must be None, 2-D or 4-D (flex BlockMasks are not supported), "
        f"got shape {tuple(attention_mask.shape)}"
    )


class DecoderOnlyDualChunkAttention(DecoderOnlySoftmaxAttentionBase):
    """Dual Chunk Attention with Llama's projections (`q_proj k_proj v_proj o_proj`), so Llama / Qwen2 attention
    weights load 1:1. Keys are cached rotated at `position mod c` in the ordinary key/value cache layer, without the
    temperature; positions come from `position_ids` (per row, absolute)."""

    # From this many query tokens the tiled flash path replaces the reference path. Query rows per tile of each path
    # (the reference path holds three `[B, H, rows, S]` score blocks per tile).
    fast_path_min_tokens: int = 512
    rows_per_tile: int = 2048
    reference_rows_per_tile: int = 256

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.chunk_size = config.chunk_size
        self.local_size = config.local_size
        self.chunk_len = self.chunk_size - self.local_size
        self.original_max_position_embeddings = (config.dual_chunk_attention_config or {}).get(
            "original_max_position_embeddings"
        )

    @staticmethod
    def _rotate(states: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """RoPE of `states [B, heads, T, d]` at integer `positions [B, T]` (plain frequencies, attention factor 1)."""
        cos, sin = rope_cos_sin(inv_freq, positions, states.dtype)
        return apply_rotary(states, cos[:, None], sin[:, None])

    @staticmethod
    def _rotate_queries(
        query: torch.Tensor, positions: tuple[torch.Tensor, ...], inv_freq: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The query rotated at each of several position sets. `apply_rotary(x) = x cos + rotate_half(x) sin`, and
        `rotate_half(x)` does not depend on the position, so it is computed once for all of them."""
        rotated_half = rotate_half(query)
        tables = (rope_cos_sin(inv_freq, p, query.dtype) for p in positions)
        return tuple(query * cos[:, None] + rotated_half * sin[:, None] for cos, sin in tables)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # `position_embeddings` (the model's RoPE/YaRN tables) are ignored: DCA rotates at remapped positions with the
        # plain `rope_theta` frequencies.
        batch, num_queries, _ = hidden_states.shape
        past_len = int(cache.get_seq_length(self.layer_idx)) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + num_queries, device=hidden_states.device)
        position_ids = position_ids.expand(batch, num_queries)

        hidden_shape = (batch, num_queries, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        # Computed per call (d/2 values) rather than kept as a buffer that loading on the meta device would leave empty.
        inv_freq, _ = compute_default_rope_parameters(self.config, device=hidden_states.device)
        key = self._rotate(key, torch.remainder(position_ids, self.chunk_len), inv_freq)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        num_keys = past_len + num_queries  # a static cache's later slots are unused (and would be masked)
        key, value = key[:, :, :num_keys], value[:, :, :num_keys]

        # The temperature multiplies every logit of the row once: fold it into the queries (keys are cached without).
        if self.original_max_position_embeddings:
            temperature = dual_chunk_temperature(position_ids, self.original_max_position_embeddings)
            query = query * temperature.to(query.dtype)[:, None, None, None]
        intra, succ, inter = dual_chunk_query_positions(position_ids, self.chunk_len, self.chunk_size)
        # The inter position is one constant: a [B, 1] table broadcasts over the tokens.
        queries = self._rotate_queries(query, (intra, succ, inter[:, :1]), inv_freq)
        attention_mask = _as_4d_mask(attention_mask, num_queries)
        dropout = self.attention_dropout if self.training else 0.0
        return_weights = bool(kwargs.get("output_attentions")) or self.config._attn_implementation == "eager"

        offsets = None
        if not return_weights and dropout == 0.0 and num_queries >= self.fast_path_min_tokens:
            offsets = _contiguous_offsets(position_ids, attention_mask, past_len)
        if offsets is not None:
            out, weights = self._fast_attention(queries, key, value, attention_mask, past_len, offsets), None
        else:
            # Cached slots precede the row's first new token: p_j = p_first - (past_len - j) (attention-math §5.6).
            past_positions = position_ids[:, :1] - torch.arange(past_len, 0, -1, device=position_ids.device)
            key_positions = torch.cat([past_positions, position_ids], dim=1)
            out, weights = dual_chunk_reference_attention(
                queries, key, value, position_ids, key_positions, attention_mask, past_len, self.chunk_len,
                self.scaling, self.num_key_value_groups, dropout=dropout, training=self.training,
                return_weights=return_weights, rows_per_tile=self.reference_rows_per_tile,
            )  # fmt: skip

        out = out.transpose(1, 2).reshape(batch, num_queries, -1).contiguous()
        return self.o_proj(out), weights

    def _fast_attention(self, queries, key, value, attention_mask, past_len: int, offsets: torch.Tensor):
        """Tiled flash path; rows whose positions start at different offsets (left padding) get their own plans."""
        offsets = offsets.tolist()
        if len(set(offsets)) == 1:
            return dual_chunk_fast_attention(
                queries, key, value, attention_mask, past_len, offsets[0], self.chunk_len, self.scaling,
                rows_per_tile=self.rows_per_tile,
            )  # fmt: skip
        rows = []
        for b, offset in enumerate(offsets):
            mask = attention_mask[b : b + 1] if attention_mask is not None else None
            rows.append(
                dual_chunk_fast_attention(
                    tuple(q[b : b + 1] for q in queries), key[b : b + 1], value[b : b + 1], mask, past_len, offset,
                    self.chunk_len, self.scaling, rows_per_tile=self.rows_per_tile,
                )  # fmt: skip
            )
        return torch.cat(rows, dim=0)
