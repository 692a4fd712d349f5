"""Convert a transformers Llama or Qwen2 causal LM into an equivalent DecoderOnly model.

The softmax path uses Llama's parameter names, so weights copy one to one; the converted model has an RMSNorm final
norm, the source's biases, no input projection and no dropout. Config overrides (e.g. `attention_type="dual_chunk"`
for the Qwen2.5-1M workflow) are applied afterwards.

Command line::

    python -m modeling.convert SRC_FOLDER DST_FOLDER [--attention-type dual_chunk] [--set chunk_size=4096 ...]
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def config_from_llama(source_config, **overrides) -> dict:
    """DecoderOnlyConfig keyword arguments describing the same network as a Llama/Qwen2 config."""
    if source_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"from_llama: source model_type={source_config.model_type!r} is not supported; "
            f"expected one of {SUPPORTED_MODEL_TYPES}."
        )
    layer_types = getattr(source_config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            f"from_llama: source layer_types={sorted(set(layer_types))} are not supported; only full attention "
            "(Qwen2 sliding-window layers have no DecoderOnly equivalent)."
        )
    if getattr(source_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"from_llama: hidden_act={source_config.hidden_act!r} is not supported; expected 'silu'.")
    rope = dict(source_config.rope_parameters)
    kwargs = {
        "vocab_size": source_config.vocab_size,
        "hidden_size": source_config.hidden_size,
        "intermediate_size": source_config.intermediate_size,
        "num_hidden_layers": source_config.num_hidden_layers,
        "num_attention_heads": source_config.num_attention_heads,
        "num_key_value_heads": source_config.num_key_value_heads,
        "head_dim": getattr(source_config, "head_dim", None)
        or source_config.hidden_size // source_config.num_attention_heads,
        "rms_norm_eps": source_config.rms_norm_eps,
        "max_position_embeddings": source_config.max_position_embeddings,
        "final_norm": "rmsnorm",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "mlp_bias": getattr(source_config, "mlp_bias", False),
        "tie_word_embeddings": source_config.tie_word_embeddings,
        "pad_token_id": source_config.pad_token_id,
        "bos_token_id": source_config.bos_token_id,
        "eos_token_id": source_config.eos_token_id,
        "initializer_range": source_config.initializer_range,
    }
    if source_config.model_type == "qwen2":  # biases on q/k/v, none on o_proj
        kwargs.update(attention_bias=True, attention_output_bias=False)
    else:
        kwargs.update(attention_bias=source_config.attention_bias)
    if rope.get("rope_type") == "yarn":
        kwargs.update(
            yarn=True,
            yarn_scale=rope["factor"],
            yarn_original_max_position=rope["original_max_position_embeddings"],
            rope_parameters=rope,
        )
    else:
        kwargs["rope_parameters"] = rope
    kwargs.update(overrides)
    return kwargs


def load_source(source: PreTrainedModel | str | Path) -> PreTrainedModel:
    """A Llama/Qwen2 causal LM instance, or one loaded from a saved folder."""
    if isinstance(source, (str, Path)):
        return AutoModelForCausalLM.from_pretrained(source)
    if not isinstance(source, PreTrainedModel):
        raise TypeError(f"from_llama: source must be a PreTrainedModel or a folder path, got {type(source).__name__}.")
    return source


def convert_llama(cls, source: PreTrainedModel | str | Path, **config_overrides) -> PreTrainedModel:
    """Build `cls` (a DecoderOnly class) with the source's weights. See `DecoderOnlyForCausalLM.from_llama`."""
    from .modeling_decoder_only import DecoderOnlyConfig  # noqa: PLC0415  (the model module imports this one lazily)

    source = load_source(source)
    config = DecoderOnlyConfig(**config_from_llama(source.config, **config_overrides))
    model = cls(config).to(dtype=source.dtype)
    state = {name: tensor for name, tensor in source.state_dict().items() if not name.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        # Expected only when overrides change a layer's parameters (e.g. a lightning layer): say which stay random.
        logger.warning(
            "from_llama: %d parameters were not in the source and keep their initial values (%s); "
            "%d source tensors were not used (%s).",
            len(missing),
            ", ".join(missing[:8]),
            len(unexpected),
            ", ".join(unexpected[:8]),
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def parse_value(text: str):
    """`--set` values are JSON when they parse (numbers, booleans, lists, null), strings otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a Llama/Qwen2 checkpoint folder into a DecoderOnly one.")
    parser.add_argument("source", help="folder of a saved LlamaForCausalLM or Qwen2ForCausalLM")
    parser.add_argument("destination", help="folder to write the DecoderOnly checkpoint to")
    parser.add_argument("--attention-type", choices=["gqa", "lightning", "dual_chunk"], default=None)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any DecoderOnlyConfig override"
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = parse_value(value)
    if args.attention_type:
        overrides["attention_type"] = args.attention_type

    from .modeling_decoder_only import DecoderOnlyForCausalLM  # noqa: PLC0415

    model = DecoderOnlyForCausalLM.from_llama(args.source, **overrides)
    model.save_pretrained(args.destination)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.destination}: {model.config.attention_types} ({num_parameters} parameters)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
