"""Small factories shared by the test files: tiny configs and randomised weights."""

import torch

from configuration import DecoderOnlyConfig


def tiny_config(**overrides) -> DecoderOnlyConfig:
    """A 2-layer, 32-wide GQA config without dropout; any field can be overridden."""
    kwargs = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "dropout": 0.0,
        "block_size": 4,
        "chunk_size": 8,
        "local_size": 2,
    }
    kwargs.update(overrides)
    return DecoderOnlyConfig(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norm gains and biases included) random values, so no term is trivially 1 or 0."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            param.copy_(1.0 + scale * noise)
        else:
            param.copy_(scale * noise)
    return model


def assert_cached_generation_matches(model, prompts: torch.Tensor, **generate_kwargs) -> torch.Tensor:
    """`generate()` with the cache gives exactly the tokens of `use_cache=False`; returns the cached result."""
    cached = model.generate(prompts, **generate_kwargs)
    assert torch.equal(cached, model.generate(prompts, use_cache=False, **generate_kwargs))
    return cached


def assert_left_padding_matches_alone(
    model, rows: list[torch.Tensor], pad_token_id: int = 0, **generate_kwargs
) -> None:
    """A left-padded batch generates, row by row, the same new tokens as each row alone."""
    width = max(len(row) for row in rows)
    pads = [torch.full((width - len(row),), pad_token_id, dtype=torch.long) for row in rows]
    input_ids = torch.stack([torch.cat([pad, row]) for pad, row in zip(pads, rows)])
    attention_mask = torch.stack(
        [torch.cat([torch.zeros_like(pad), torch.ones_like(row)]) for pad, row in zip(pads, rows)]
    )
    batch = model.generate(input_ids, attention_mask=attention_mask, **generate_kwargs)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], **generate_kwargs)
        assert torch.equal(batch[i, width:], alone[0, len(row) :]), f"row {i}"
