"""Quickstart (`make demo`): a tiny DecoderOnly language model trained from scratch on bundled text, in about a minute
on a laptop CPU.

1. train a byte-level BPE tokenizer on `examples/data/village_tales.txt` (offline);
2. build a small DecoderOnly causal LM (default: hidden 128, 4 heads, 2 key/value heads, 4 gqa layers);
3. train it for a few dozen AdamW steps on random windows of the text, showing training and held-out loss fall;
4. save a Hub-ready folder (weights, config with auto_map, model code, README, tokenizer) under `outputs/`;
5. reload it with `AutoModelForCausalLM.from_pretrained` and generate with the KV cache (greedy and sampled).

Run `python examples/quickstart.py --help` for the options (steps, attention type, sizes, output folder).
"""

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from configuration import hybrid_attention_types
from modeling import DecoderOnlyConfig, DecoderOnlyForCausalLM
from modeling.hub import export_for_hub
from modeling.tokenization import read_text_files, train_tokenizer


ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "examples" / "data" / "village_tales.txt"
DEFAULT_OUTPUT = ROOT / "outputs" / "quickstart"
# Layouts of --attention; "hybrid" is MiniMax-01 style, Lightning (linear) layers with every second one softmax.
LAYOUTS = {
    "gqa": lambda n: ["gqa"] * n,
    "lightning": lambda n: ["lightning"] * n,
    "dual_chunk": lambda n: ["dual_chunk"] * n,
    "hybrid": lambda n: hybrid_attention_types(n, softmax_every=2),
}
PROMPTS = ["The baker", "In winter the river"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimisation steps (default: 120)")
    parser.add_argument("--attention", choices=sorted(LAYOUTS), default="gqa", help="attention layout (default: gqa)")
    parser.add_argument(
        "--output-dir", type=Path, default=DEFAULT_OUTPUT, help=f"where to save (default: {DEFAULT_OUTPUT})"
    )
    parser.add_argument("--data", type=Path, nargs="+", default=[DEFAULT_DATA], help="UTF-8 text files to train on")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (default: 1024)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads of gqa and dual_chunk layers")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128, help="training window in tokens (default: 128)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (logs still print)")
    return parser.parse_args(argv)


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def token_stream(tokenizer, paragraphs: list[str]) -> torch.Tensor:
    """All paragraphs as one id stream: `<s> paragraph </s>` each, so windows see document boundaries."""
    ids = tokenizer(paragraphs)["input_ids"]
    return torch.tensor([token for paragraph in ids for token in paragraph + [tokenizer.eos_token_id]])


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[start : start + seq_len] for start in starts.tolist()])


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int) -> float:
    """Mean next-token loss over consecutive windows of `stream` (the held-out text)."""
    model.eval()
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    loss = model(input_ids=windows, labels=windows).loss.item()
    model.train()
    return loss


def build_model(args: argparse.Namespace, tokenizer) -> DecoderOnlyForCausalLM:
    config = DecoderOnlyConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        num_layers=args.layers,
        attention_types=LAYOUTS[args.attention](args.layers),
        block_size=32,  # Lightning block length (a speed knob)
        chunk_size=64,  # Dual Chunk: several chunks per training window
        dropout=0.0,  # a few dozen steps on a small corpus: regularisation only slows the demo down
        max_position_embeddings=max(args.seq_len, 2048),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return DecoderOnlyForCausalLM(config)


def train(model, train_stream: torch.Tensor, val_stream: torch.Tensor, args: argparse.Namespace) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"held-out loss before training: {evaluate(model, val_stream, args.seq_len):.3f} "
          f"(uniform guess: ln {model.config.vocab_size} = {math.log(model.config.vocab_size):.3f})")
    model.train()
    progress = tqdm(range(1, args.steps + 1), desc="training", unit="step", disable=args.no_progress)
    log_every = max(1, args.steps // 6)
    for index in progress:
        batch = random_windows(train_stream, args.batch_size, args.seq_len, generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if index % log_every == 0 or index == args.steps:
            learning_rate = scheduler.get_last_lr()[0]
            tqdm.write(f"step {index:4d}/{args.steps}  train loss {loss.item():.3f}  lr {learning_rate:.2e}")
    model.eval()
    print(f"held-out loss after training: {evaluate(model, val_stream, args.seq_len):.3f}")


@torch.no_grad()
def generate(model, tokenizer, max_new_tokens: int, seed: int) -> None:
    """Greedy and sampled continuations of a left-padded batch of prompts, with the KV cache (`use_cache=True`)."""
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    modes = {"greedy": {"do_sample": False}, "sampled": {"do_sample": True, "top_k": 40, "temperature": 0.8}}
    for name, options in modes.items():
        torch.manual_seed(seed)
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True, **options)
        seconds = time.perf_counter() - start
        new_tokens = (output.shape[1] - inputs["input_ids"].shape[1]) * output.shape[0]
        print(f"-- {name} ({new_tokens} new tokens in {seconds:.2f}s with the KV cache)")
        for text in tokenizer.batch_decode(output, skip_special_tokens=True):
            print(f"   {text!r}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)

    step(f"1/5 Training a byte-level BPE tokenizer on {', '.join(path.name for path in args.data)}")
    paragraphs = read_text_files(args.data)
    tokenizer = train_tokenizer(texts=paragraphs, vocab_size=args.vocab_size)
    stream = token_stream(tokenizer, paragraphs)
    split = int(len(stream) * 0.9)
    train_stream, val_stream = stream[:split], stream[split:]
    print(f"{len(paragraphs)} paragraphs, {sum(map(len, paragraphs)):,} characters -> {len(stream):,} tokens "
          f"(vocabulary {len(tokenizer)}); {len(train_stream):,} for training, {len(val_stream):,} held out")

    step(f"2/5 Building a DecoderOnly causal LM ({args.attention})")
    model = build_model(args, tokenizer)
    config = model.config
    print(f"{model.num_parameters():,} parameters; hidden {config.hidden_size}, {config.num_attention_heads} heads, "
          f"{config.num_key_value_heads} kv heads, layers {config.attention_types}")

    step(f"3/5 Training for {args.steps} AdamW steps (batch {args.batch_size} x {args.seq_len} tokens)")
    train(model, train_stream, val_stream, args)

    step(f"4/5 Saving a Hub-ready folder to {args.output_dir}")
    folder = export_for_hub(model, args.output_dir, tokenizer=tokenizer)
    print("files: " + ", ".join(sorted(path.name for path in folder.iterdir())))

    step("5/5 Reloading with AutoModelForCausalLM / AutoTokenizer and generating")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    probe = reloaded_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(reloaded(**probe).logits, model(**probe).logits)
    print(f"reloaded {type(reloaded).__name__}: logits identical to the trained model: {same}")
    if not same:
        raise SystemExit("the reloaded model does not reproduce the trained one")
    generate(reloaded, reloaded_tokenizer, args.max_new_tokens, args.seed)

    print(f"\nDone in {time.perf_counter() - started:.1f}s. Load it anywhere with transformers alone:\n"
          f"  AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
