"""Dual Chunk Attention (ChunkLlama / Qwen2.5-1M). Placeholder until its issue lands."""

from torch import nn


class DecoderOnlyDualChunkAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        raise NotImplementedError("attention type 'dual_chunk' is not implemented yet")
