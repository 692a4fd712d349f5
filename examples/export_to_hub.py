"""Export a DecoderOnly model as a Hub-ready folder, and optionally push it to the Hugging Face Hub.

The folder loads with transformers alone (`trust_remote_code=True`): config.json with `auto_map` for AutoConfig,
AutoModel, AutoModelForCausalLM and AutoModelForSequenceClassification, safetensors weights, the model code as flat
.py files, README.md rendered from `model_card.md`, and the tokenizer when there is one.

Examples:

    # export a checkpoint you trained (e.g. the quickstart's), tokenizer included when the folder has one
    python examples/export_to_hub.py --model outputs/quickstart --output-dir outputs/hub_export

    # export a freshly initialised hybrid model with a tokenizer trained on the bundled text
    python examples/export_to_hub.py --attention hybrid --layers 4 --train-tokenizer

    # also upload exactly that folder (needs network and a token: `hf auth login` or HF_TOKEN)
    python examples/export_to_hub.py --model outputs/quickstart --push your-name/decoder-only-tiny
"""

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from configuration import hybrid_attention_types
from modeling import DecoderOnlyConfig, DecoderOnlyForCausalLM
from modeling.hub import export_for_hub, push_hub_folder
from modeling.tokenization import train_tokenizer


ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "outputs" / "hub_export"
DEFAULT_DATA = ROOT / "examples" / "data" / "village_tales.txt"
LAYOUTS = ("gqa", "lightning", "dual_chunk", "hybrid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model (load one with --model, or build a new one)")
    source.add_argument("--model", type=Path, help="a saved DecoderOnly CausalLM folder to export")
    source.add_argument("--attention", choices=LAYOUTS, default="gqa", help="layout of a new model (default: gqa)")
    source.add_argument("--hidden-size", type=int, default=128)
    source.add_argument("--heads", type=int, default=4)
    source.add_argument("--kv-heads", type=int, default=2)
    source.add_argument("--layers", type=int, default=4)
    source.add_argument("--vocab-size", type=int, default=1024)
    source.add_argument(
        "--train-tokenizer", action="store_true", help="train a byte-level BPE tokenizer on the bundled text"
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    hub = parser.add_argument_group("upload")
    hub.add_argument("--push", metavar="REPO_ID", help="upload the exported folder to this Hub repository")
    hub.add_argument("--private", action="store_true", help="create the repository as private")
    hub.add_argument("--commit-message", default=None)
    return parser.parse_args(argv)


def new_model(args: argparse.Namespace, tokenizer) -> DecoderOnlyForCausalLM:
    layers = args.layers
    if args.attention == "hybrid":  # lightning layers with every second one softmax (MiniMax-01 style)
        attention_types = hybrid_attention_types(layers, softmax_every=2)
    else:
        attention_types = [args.attention] * layers
    special_ids = {}
    if tokenizer is not None:
        special_ids = dict(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    config = DecoderOnlyConfig(
        vocab_size=len(tokenizer) if tokenizer is not None else args.vocab_size,
        hidden_size=args.hidden_size,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        num_layers=layers,
        attention_types=attention_types,
        **special_ids,
    )
    return DecoderOnlyForCausalLM(config)


def load_or_build(args: argparse.Namespace):
    """(model, tokenizer or None): the checkpoint of `--model` with its tokenizer if saved there, else a new model."""
    if args.model is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model)
        has_tokenizer = (args.model / "tokenizer_config.json").is_file()
        return model, AutoTokenizer.from_pretrained(args.model) if has_tokenizer else None
    tokenizer = None
    if args.train_tokenizer:
        tokenizer = train_tokenizer(files=[DEFAULT_DATA], vocab_size=args.vocab_size)
    return new_model(args, tokenizer), tokenizer


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    model, tokenizer = load_or_build(args)
    print(f"{type(model).__name__}: {model.num_parameters():,} parameters, layers {model.config.attention_types}")
    folder = export_for_hub(model, args.output_dir, tokenizer=tokenizer)
    print(f"exported to {folder}:")
    for path in sorted(folder.iterdir()):
        print(f"  {path.name:36s} {path.stat().st_size:>12,} bytes")
    print(f"load it with transformers alone: AutoModelForCausalLM.from_pretrained({str(folder)!r}, "
          "trust_remote_code=True)")
    if args.push:
        message = args.commit_message or f"Upload {type(model).__name__}"
        commit = push_hub_folder(folder, args.push, commit_message=message, private=args.private or None)
        print(f"pushed {folder} to {args.push}: {getattr(commit, 'commit_url', commit)}")
    return folder


if __name__ == "__main__":
    main()
