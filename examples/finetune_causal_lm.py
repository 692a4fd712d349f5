#!/usr/bin/env python
"""Train a small DecoderOnlyForCausalLM on text with transformers' `Trainer` (CPU is enough).

    python examples/finetune_causal_lm.py                          # bundled text in examples/data, 1-2 min on 2 cores
    python examples/finetune_causal_lm.py --max_steps 50 --gradient_accumulation_steps 4 --gradient_checkpointing
    python examples/finetune_causal_lm.py --text_file my.txt --bf16 --output_dir runs/lm
    python examples/finetune_causal_lm.py --model_name_or_path runs/lm   # continue from a saved checkpoint

Labels are the input ids (the model's loss shifts them); every block is a full `--seq_len` window of the token
stream, so no padding is needed. The script evaluates before and after training and prints both losses.
Heavy imports happen after argument parsing, so `--help` is instant.

The helpers here (`load_texts`, `get_tokenizer`, `LMBlockDataset`, `build_causal_lm`) are reused by
`examples/lora.py` and `examples/train_ddp.py`.
"""

import argparse
import glob
import json
import math
import os
import random
import sys


EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(EXAMPLES_DIR)
DATA_DIR = os.path.join(EXAMPLES_DIR, "data")
if REPO_ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO_ROOT)


# ------------------------------------------------------------------------------------------------------------- data
_SUBJECTS = [
    "the miller", "the ferryman", "a heron", "the baker", "old Ada", "the children", "a fisherman", "the smith",
]
_VERBS = ["watches", "crosses", "mends", "carries", "greets", "follows", "paints", "counts"]
_OBJECTS = [
    "the river", "the bridge", "a basket of bread", "the nets", "the boats", "the grey clouds", "the mill wheel",
]
_ENDINGS = ["at dawn.", "before the rain.", "every morning.", "in the evening.", "when the bells ring.", "again."]


def synthetic_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Template sentences (a small grammar): learnable in a few dozen steps, no download needed."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        for _ in range(num_lines)
    ]


def load_texts(text_file: str | None = None, synthetic: bool = False, num_synthetic_lines: int = 2000) -> list[str]:
    """Paragraphs of `text_file`, else the bundled `examples/data/*.txt`, else (or with `synthetic`) template text."""
    if synthetic:
        return synthetic_corpus(num_synthetic_lines)
    files = [text_file] if text_file else sorted(glob.glob(os.path.join(DATA_DIR, "*.txt")))
    texts = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            texts += [p.strip() for p in handle.read().split("\n\n") if p.strip()]
    return texts or synthetic_corpus(num_synthetic_lines)


def get_tokenizer(texts: list[str], vocab_size: int = 512, tokenizer_name_or_path: str | None = None):
    """A saved tokenizer (`tokenizer_name_or_path`), else a byte-level BPE trained offline on `texts`
    (`modeling.tokenization.train_tokenizer`: `<pad>`, `<s>`, `</s>` are ids 0, 1, 2)."""
    if tokenizer_name_or_path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    from modeling.tokenization import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class LMBlockDataset:
    """The token stream of all texts (each followed by EOS) cut into `seq_len` blocks: `{input_ids, labels}`."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> None:
        import torch

        ids: list[int] = []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for text in texts:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        n_blocks = len(ids) // seq_len
        if max_blocks is not None:
            n_blocks = min(n_blocks, max_blocks)
        if n_blocks == 0:
            raise ValueError(f"the texts give {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
        self.blocks = torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}

    def split(self, eval_fraction: float):
        """(train, eval) views; the last `eval_fraction` of the blocks is held out."""
        n_eval = max(1, int(len(self) * eval_fraction))
        train, held = _Subset(self.blocks[:-n_eval]), _Subset(self.blocks[-n_eval:])
        return train, held


class _Subset(LMBlockDataset):
    def __init__(self, blocks) -> None:  # noqa: D107 - a view on existing blocks
        self.blocks = blocks


def build_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, attention_type="gqa",
                    dropout=0.0, attention_types=None, seed=0, **config_kwargs):
    """A randomly initialised DecoderOnlyForCausalLM sized for `tokenizer`."""
    import torch

    from modeling import DecoderOnlyConfig, DecoderOnlyForCausalLM

    config = DecoderOnlyConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        attention_type=attention_type,
        attention_types=attention_types,
        dropout=dropout,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    return DecoderOnlyForCausalLM(config)


# -------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--text_file", help="UTF-8 text, paragraphs separated by blank lines (default: examples/data)")
    data.add_argument("--synthetic", action="store_true", help="train on generated template sentences instead")
    data.add_argument("--seq_len", type=int, default=64, help="tokens per training block (default 64)")
    data.add_argument("--max_blocks", type=int, default=None, help="use at most this many blocks")
    data.add_argument("--eval_fraction", type=float, default=0.1, help="held-out share of blocks (default 0.1)")
    data.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary when training a tokenizer")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="continue from a saved DecoderOnlyForCausalLM folder")
    model.add_argument("--tokenizer_name_or_path", help="saved tokenizer folder (default: train one on the text)")
    model.add_argument("--hidden_size", type=int, default=64)
    model.add_argument("--num_layers", type=int, default=2)
    model.add_argument("--num_heads", type=int, default=4)
    model.add_argument("--num_kv_heads", type=int, default=2)
    model.add_argument("--attention_type", default="gqa", choices=["gqa", "lightning", "dual_chunk"])
    model.add_argument("--dropout", type=float, default=0.0)
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="runs/finetune_causal_lm")
    train.add_argument("--max_steps", type=int, default=120,
                       help="optimizer steps (default 120, ~8 epochs of the bundled text)")
    train.add_argument("--batch_size", type=int, default=8, help="per-device train batch size")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=3e-3)
    train.add_argument("--warmup_steps", type=int, default=10)
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="activation checkpointing (TrainingArguments(activation_checkpointing=True))")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU autocast works with torch >= 2.x)")
    train.add_argument("--logging_steps", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no_save", action="store_true", help="do not save the final model and tokenizer")
    train.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    import modeling  # noqa: F401  (registers the Auto classes)

    torch.manual_seed(args.seed)
    texts = load_texts(args.text_file, synthetic=args.synthetic)
    tokenizer = get_tokenizer(
        texts, args.vocab_size, args.tokenizer_name_or_path or args.model_name_or_path
    )
    blocks = LMBlockDataset(texts, tokenizer, args.seq_len, args.max_blocks)
    train_set, eval_set = blocks.split(args.eval_fraction)

    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    else:
        model = build_causal_lm(
            tokenizer, args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads,
            args.attention_type, args.dropout, seed=args.seed,
        )
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(train_set)} train / {len(eval_set)} eval blocks of {args.seq_len} tokens")

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        activation_checkpointing=args.gradient_checkpointing or None,
        bf16=args.bf16,
        use_cpu=True,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.disable_tqdm,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_loss"]
    train_output = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "perplexity_after": math.exp(min(after, 50.0)),
        "train_loss": train_output.training_loss,
        "logged_losses": losses,
        "steps": trainer.state.global_step,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "logged_losses"}, indent=2))
    if not args.no_save:
        trainer.save_model(args.output_dir)  # model + tokenizer (processing_class)
        print(f"saved to {args.output_dir}")
    return result


if __name__ == "__main__":
    main()
