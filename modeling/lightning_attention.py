"""Lightning Attention-2 (MiniMax-01 layer). Placeholder until its issue lands."""

from torch import nn


class DecoderOnlyLightningAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        raise NotImplementedError("attention type 'lightning' is not implemented yet")
