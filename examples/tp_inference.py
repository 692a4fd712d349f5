#!/usr/bin/env python
"""Tensor-parallel (TP) inference of a saved DecoderOnlyForCausalLM with transformers' built-in TP plan.

    torchrun --nproc_per_node 2 examples/tp_inference.py runs/finetune_causal_lm          # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 examples/tp_inference.py runs/lm --api tp_plan     # from_pretrained(tp_plan="auto")

`from_pretrained(folder, distributed_config=DistributedConfig(tp_plan="auto"))` shards the layers named in
`DecoderOnlyConfig.base_model_tp_plan` (q/k/v/gate/up column-wise, o/down row-wise) and `lm_head`
(`colwise_gather_output`) over the processes; each rank holds 1/world_size of those weights as DTensor shards.
On CPU transformers builds the device mesh on the `gloo` backend, so this runs without GPUs. Every rank computes the
same full logits; the script compares them with the unsharded model and rank 0 writes `<folder or --output>` JSON.
Heads must divide evenly: num_attention_heads and num_key_value_heads must be multiples of the number of processes.
Softmax (gqa) layers only: lightning/dual_chunk modules have no TP rules yet and stay replicated.
"""

import argparse
import json
import os
import sys


EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(EXAMPLES_DIR)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="saved DecoderOnlyForCausalLM folder")
    parser.add_argument("--output", help="result JSON (default: <model>/tp_result.json)")
    parser.add_argument("--seq_len", type=int, default=16)
    parser.add_argument("--api", default="distributed_config", choices=["distributed_config", "tp_plan", "both"],
                        help="from_pretrained(distributed_config=DistributedConfig(tp_plan='auto')) (default), the "
                             "deprecated from_pretrained(tp_plan='auto'), or both one after the other")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    import torch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, DistributedConfig

    import modeling  # noqa: F401  (registers the Auto classes)

    reference = AutoModelForCausalLM.from_pretrained(args.model).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, reference.config.vocab_size, (2, args.seq_len), generator=generator)
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits

    def load(api: str):
        if api == "tp_plan":
            return AutoModelForCausalLM.from_pretrained(args.model, tp_plan="auto").eval()
        return AutoModelForCausalLM.from_pretrained(
            args.model, distributed_config=DistributedConfig(tp_plan="auto")
        ).eval()

    result = {}
    for api in ("distributed_config", "tp_plan") if args.api == "both" else (args.api,):
        model = load(api)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        result[api] = shard_report(model, reference, logits, expected)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0  # TP loading initialised it
    result["rank"] = rank
    print(json.dumps(result), flush=True)
    if rank == 0:
        with open(args.output or os.path.join(args.model, "tp_result.json"), "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def shard_report(model, reference, logits, expected) -> dict:
    """World size, the logits' max difference to the unsharded model, and local shapes of some sharded weights."""
    import torch
    from torch.distributed.tensor import DTensor

    def local_shape(name: str) -> list[int]:
        weight = model.get_parameter(name)
        return list(weight.to_local().shape if isinstance(weight, DTensor) else weight.shape)

    q_name = "model.layers.0.self_attn.q_proj.weight"
    return {
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "max_abs_diff": (logits - expected).abs().max().item(),
        "q_proj_full_shape": list(reference.get_parameter(q_name).shape),
        "q_proj_local_shape": local_shape(q_name),
        "o_proj_local_shape": local_shape("model.layers.0.self_attn.o_proj.weight"),
        "down_proj_local_shape": local_shape("model.layers.0.mlp.down_proj.weight"),
        "dtensor_parameters": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
    }


if __name__ == "__main__":
    from train_ddp import run_distributed  # the script's folder is on sys.path when run as a script

    run_distributed(main)
