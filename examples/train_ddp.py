#!/usr/bin/env python
"""Data-parallel (DDP) training of DecoderOnlyForCausalLM with transformers' `Trainer`, on CPUs (gloo) or GPUs (nccl).

    torchrun --nproc_per_node 2 examples/train_ddp.py --per_device_batch_size 4     # 2 processes, global batch 8
    python examples/train_ddp.py --per_device_batch_size 8                          # 1 process, same global batch
    accelerate launch --num_processes 2 --cpu examples/train_ddp.py                 # the same with accelerate

The Trainer detects the torchrun/accelerate environment (`WORLD_SIZE`, `RANK`, ...), wraps the model in
`DistributedDataParallel` (backend `gloo` on CPU) and gives each process `per_device_batch_size` rows of every global
batch. Because DecoderOnly's forward takes `**kwargs`, the Trainer passes `num_items_in_batch` (the label-token count
gathered over all processes) to the loss, so the averaged DDP gradient equals the single-process gradient of the
same global batch: with `--sampling sequential` (or the default random sampler with the same seed) both runs see
the same rows and end with the same weights (up to float rounding; see tests/test_distributed.py).

Rank 0 writes `<output_dir>/result.json` (losses, world size) and saves the final model and tokenizer.
Heavy imports happen after argument parsing, so `--help` is instant.
"""

import argparse
import json
import os
import sys


EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES_DIR not in sys.path:
    sys.path.insert(0, EXAMPLES_DIR)

from finetune_causal_lm import REPO_ROOT  # noqa: E402,F401  (also puts the repository on sys.path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/train_ddp")
    parser.add_argument("--text_file", help="UTF-8 text (default: examples/data, else synthetic sentences)")
    parser.add_argument("--synthetic", action="store_true", help="train on generated template sentences")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--max_blocks", type=int, default=None)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--attention_type", default="gqa", choices=["gqa", "lightning", "dual_chunk"])
    parser.add_argument("--per_device_batch_size", type=int, default=4,
                        help="rows per process; the global batch is this times the number of processes")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim (e.g. adamw_torch, sgd)")
    parser.add_argument("--sampling", default="random", choices=["random", "sequential"],
                        help="TrainingArguments.train_sampling_strategy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_save", action="store_true", help="write result.json only, not the model")
    parser.add_argument("--disable_tqdm", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from finetune_causal_lm import LMBlockDataset, build_causal_lm, get_tokenizer, load_texts

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun / accelerate launch
    texts = load_texts(args.text_file, synthetic=args.synthetic)
    tokenizer = get_tokenizer(texts, args.vocab_size)  # deterministic: every rank trains the same vocabulary
    train_set = LMBlockDataset(texts, tokenizer, args.seq_len, args.max_blocks)
    model = build_causal_lm(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers,
                            attention_type=args.attention_type, seed=args.seed)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        optim=args.optim,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        train_sampling_strategy=args.sampling,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient (saves a graph traversal per step)
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.disable_tqdm,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=default_data_collator)
    output = trainer.train()
    result = {
        "world_size": training_args.world_size,
        "global_batch": args.per_device_batch_size * training_args.world_size * args.gradient_accumulation_steps,
        "train_loss": output.training_loss,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "steps": trainer.state.global_step,
        "vocab_size": len(tokenizer),
        "ddp": type(trainer.model_wrapped).__name__,
    }
    if not args.no_save:
        trainer.save_model(args.output_dir)  # every rank calls it; only the main process writes
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "result.json"), "w") as handle:
            json.dump(result, handle, indent=2)
        print(json.dumps(result, indent=2))
    return result


def run_distributed(entry_point) -> None:
    """Run `entry_point()`, then destroy the process group explicitly: left to interpreter exit, gloo's threads can
    abort the process ("terminate called without an active exception") after the work has finished."""
    try:
        entry_point()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_distributed(main)
