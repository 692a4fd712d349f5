#!/usr/bin/env python
"""LoRA fine-tuning of a DecoderOnlyForCausalLM with PEFT and transformers' `Trainer`, then merge the adapter.

DecoderOnly uses transformers' module names, so Llama LoRA recipes apply unchanged:
    softmax layers (gqa, dual_chunk): q_proj k_proj v_proj o_proj      MLP: gate_proj up_proj down_proj
    lightning layers:                 qkv_proj output_gate out_proj    (distinct names: target them separately)
`--target_modules all-linear` selects all of these (never lm_head).

    python examples/finetune_causal_lm.py --output_dir runs/lm               # a base model to adapt
    python examples/lora.py --base_model runs/lm                             # LoRA on the Llama names
    python examples/lora.py --base_model runs/lm --target_modules q_proj,v_proj --rank 4
    python examples/lora.py --attention_type lightning --target_modules qkv_proj,output_gate,out_proj

Without `--base_model` a randomly initialised tiny model is adapted (a smoke run). The script prints the evaluation
loss before and after training, the trainable-parameter count, and the largest logit difference between the
adapted model and `merge_and_unload()` (it should be ~1e-6 in float32); it saves the adapter and the merged model.
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


LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", help="saved DecoderOnlyForCausalLM folder (with tokenizer); default: random")
    parser.add_argument("--target_modules", default=LLAMA_TARGETS,
                        help=f"comma-separated module names, or 'all-linear' (default {LLAMA_TARGETS})")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--text_file", help="UTF-8 text (default: examples/data, else synthetic sentences)")
    parser.add_argument("--synthetic", action="store_true", help="train on generated template sentences")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--max_blocks", type=int, default=None)
    parser.add_argument("--attention_type", default="gqa", choices=["gqa", "lightning", "dual_chunk"],
                        help="attention of the random base model (ignored with --base_model)")
    parser.add_argument("--hidden_size", type=int, default=64, help="random base model width")
    parser.add_argument("--num_layers", type=int, default=2, help="random base model depth")
    parser.add_argument("--output_dir", default="runs/lora")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_save", action="store_true")
    parser.add_argument("--disable_tqdm", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    import modeling  # noqa: F401  (registers the Auto classes)
    from finetune_causal_lm import LMBlockDataset, build_causal_lm, get_tokenizer, load_texts

    torch.manual_seed(args.seed)
    texts = load_texts(args.text_file, synthetic=args.synthetic)
    tokenizer = get_tokenizer(texts, tokenizer_name_or_path=args.base_model)
    if args.base_model:
        model = AutoModelForCausalLM.from_pretrained(args.base_model)
    else:
        model = build_causal_lm(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                attention_type=args.attention_type, seed=args.seed)
    train_set, eval_set = LMBlockDataset(texts, tokenizer, args.seq_len, args.max_blocks).split(0.1)

    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    lora_config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora_config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    print(f"LoRA on {sorted(peft_model.peft_config['default'].target_modules)}: "
          f"{trainable:,} trainable of {total:,} parameters")

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        use_cpu=True,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=args.disable_tqdm,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=default_data_collator)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    # merge_and_unload folds B @ A * alpha / r into each base weight: the merged plain model must match the adapter.
    peft_model.eval()
    probe = torch.stack([eval_set[i]["input_ids"] for i in range(min(4, len(eval_set)))])
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=probe).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=probe).logits
    save = not args.no_save and trainer.is_world_process_zero()  # one writer under torchrun
    if save:
        peft_model.save_pretrained(os.path.join(args.output_dir, "adapter"))
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits
    result = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "merge_max_abs_diff": (merged_logits - adapted_logits).abs().max().item(),
        "adapter_effect_max_abs": (adapted_logits - base_logits).abs().max().item(),
    }
    if trainer.is_world_process_zero():
        print(json.dumps(result, indent=2))
    if save:
        merged.save_pretrained(os.path.join(args.output_dir, "merged"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
        print(f"saved the adapter and the merged model under {args.output_dir}")
    result["merged_model"] = merged
    return result


if __name__ == "__main__":
    main()
