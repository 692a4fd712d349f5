"""Lightning attention speed, side by side in one run (prints tables, saves benchmarks/results/lightning.png).

1. Prefill time vs sequence length: one lightning layer vs one softmax GQA layer (SDPA), same width and heads.
2. Decode time per token vs context length: lightning (constant-size state) vs GQA (growing KV cache).
3. Our lightning layer vs transformers' MiniMaxLightningAttention on the same shapes: a full prefill, and a 256-token
   continuation on a cached state (MiniMax loops token by token there; ours stays blockwise).

Targets on 2 CPU cores: t(16k)/t(2k) <= 9 for lightning prefill; decode at 16k within 1.2x of decode at 256;
continuation >= 10x faster than MiniMax's; full prefill no slower than MiniMax's.

    python benchmarks/bench_lightning.py            # full run (lengths 512 ... 16k)
    python benchmarks/bench_lightning.py --quick    # a short smoke run
"""

import argparse

import torch
from transformers import MiniMaxConfig
from transformers.cache_utils import DynamicCache
from transformers.models.minimax.modeling_minimax import MiniMaxCache, MiniMaxLightningAttention

from common import median_seconds, print_table, save_plot
from configuration import DecoderOnlyConfig
from modeling.gqa_attention import DecoderOnlyAttention
from modeling.layers import DecoderOnlyRotaryEmbedding
from modeling.lightning_attention import DecoderOnlyLightningAttention
from modeling.recurrent_cache import ensure_recurrent_cache_layers


HIDDEN, HEADS, KV_HEADS, LAYERS = 256, 8, 2, 4


def build_layers(block_size: int):
    common = {"hidden_size": HIDDEN, "num_heads": HEADS, "num_kv_heads": KV_HEADS, "num_layers": LAYERS, "dropout": 0.0}
    lightning_config = DecoderOnlyConfig(attention_type="lightning", block_size=block_size, **common)
    gqa_config = DecoderOnlyConfig(attn_implementation="sdpa", **common)
    lightning = DecoderOnlyLightningAttention(lightning_config, layer_idx=0).eval()
    gqa = DecoderOnlyAttention(gqa_config, layer_idx=0).eval()
    minimax_config = MiniMaxConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        num_hidden_layers=LAYERS,
        layer_types=["linear_attention"] * LAYERS,
        block_size=256,
        hidden_act="silu",
        intermediate_size=64,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    minimax = MiniMaxLightningAttention(minimax_config, layer_idx=0).eval()
    minimax.load_state_dict(
        {k: v for k, v in lightning.state_dict().items() if k in minimax.state_dict()}, strict=False
    )
    return lightning_config, lightning, gqa_config, gqa, DecoderOnlyRotaryEmbedding(gqa_config), minimax


def lightning_cache(config, hidden, lightning):
    cache = DynamicCache(config=config)
    ensure_recurrent_cache_layers(cache, config)
    lightning(hidden, cache=cache, position_ids=torch.arange(hidden.shape[1])[None])
    return cache


def gqa_forward(gqa, rotary, hidden, start: int = 0, cache=None):
    positions = torch.arange(start, start + hidden.shape[1])[None]
    return gqa(hidden, position_embeddings=rotary(hidden, positions), attention_mask=None, cache=cache)


def bench_prefill(lengths, lightning, gqa, rotary, repeats):
    rows = []
    for length in lengths:
        hidden = torch.randn(1, length, HIDDEN)
        positions = torch.arange(length)[None]
        t_light = median_seconds(lambda: lightning(hidden, position_ids=positions), repeats)
        t_gqa = median_seconds(lambda: gqa_forward(gqa, rotary, hidden), repeats)
        rows.append([length, t_light * 1e3, t_gqa * 1e3, t_gqa / t_light])
    return rows


def bench_decode(contexts, lightning_config, lightning, gqa_config, gqa, rotary, steps):
    rows = []
    for context in contexts:
        prompt = torch.randn(1, context, HIDDEN)
        token = torch.randn(1, 1, HIDDEN)
        with torch.no_grad():
            l_cache = lightning_cache(lightning_config, prompt, lightning)
            g_cache = DynamicCache(config=gqa_config)
            gqa_forward(gqa, rotary, prompt, cache=g_cache)
        position = torch.tensor([[context]])
        t_light = median_seconds(lambda: lightning(token, cache=l_cache, position_ids=position), steps)
        t_gqa = median_seconds(lambda: gqa_forward(gqa, rotary, token, start=context, cache=g_cache), steps)
        rows.append([context, t_light * 1e3, t_gqa * 1e3])
    return rows


def bench_minimax(lengths, lightning_config, lightning, minimax, repeats, continuation=256):
    rows = []
    for length in lengths:
        hidden = torch.randn(1, length, HIDDEN)
        new = torch.randn(1, continuation, HIDDEN)
        positions = torch.arange(length)[None]
        t_ours = median_seconds(lambda: lightning(hidden, position_ids=positions), repeats)
        t_ref = median_seconds(lambda: minimax(hidden, position_embeddings=None, attention_mask=None), repeats)
        with torch.no_grad():
            state = minimax(hidden, position_embeddings=None, attention_mask=None)[1]

        ours_cache = lightning_cache(lightning_config, hidden, lightning)
        layer = ours_cache.layers[0]
        saved_state = layer.recurrent_states[0].clone()

        def run_ours():  # restore the prefill state so every repeat continues from the same point
            layer.recurrent_states[0].copy_(saved_state)
            lightning(new, cache=ours_cache, position_ids=torch.arange(length, length + continuation)[None])

        def run_ref():
            cache = MiniMaxCache()
            cache.set_linear_cache(0, state.clone())
            minimax(new, position_embeddings=None, attention_mask=None, cache=cache)

        t_ours_c = median_seconds(run_ours, repeats)
        t_ref_c = median_seconds(run_ref, repeats)
        rows.append(
            [length, t_ours * 1e3, t_ref * 1e3, t_ref / t_ours, t_ours_c * 1e3, t_ref_c * 1e3, t_ref_c / t_ours_c]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short lengths and fewer repeats")
    parser.add_argument("--block-size", type=int, default=64, help="lightning block size (default: the spec's 64)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    lengths = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    contexts = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
    repeats = 2 if args.quick else args.repeats
    lightning_config, lightning, gqa_config, gqa, rotary, minimax = build_layers(args.block_size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {HIDDEN}, {HEADS} heads "
        f"(GQA: {KV_HEADS} kv heads), batch 1, block_size {args.block_size}; medians of {repeats} runs"
    )

    prefill = bench_prefill(lengths, lightning, gqa, rotary, repeats)
    print_table("Prefill, one layer (ms)", ["tokens", "lightning", "gqa_sdpa", "gqa/lightning"], prefill)
    by_len = {row[0]: row[1] for row in prefill}
    if 16384 in by_len:
        print(f"lightning t(16k)/t(2k) = {by_len[16384] / by_len[2048]:.2f}  (target <= 9)")

    decode = bench_decode(contexts, lightning_config, lightning, gqa_config, gqa, rotary, steps=3 * repeats)
    print_table("Decode, one token (ms)", ["context", "lightning", "gqa_sdpa"], decode)
    print(
        f"lightning decode t({decode[-1][0]})/t({decode[0][0]}) = {decode[-1][1] / decode[0][1]:.2f}  (target <= 1.2)"
    )

    minimax_lengths = [1024, 2048] if args.quick else [2048, 8192]
    versus = bench_minimax(minimax_lengths, lightning_config, lightning, minimax, repeats)
    print_table(
        "Ours vs transformers MiniMaxLightningAttention (ms)",
        ["tokens", "prefill_ours", "prefill_minimax", "speedup", "cont256_ours", "cont256_minimax", "speedup"],
        versus,
    )
    path = save_plot(
        "lightning",
        [
            {
                "title": "Prefill (one layer)",
                "xlabel": "tokens",
                "ylabel": "ms",
                "series": {
                    "lightning": ([r[0] for r in prefill], [r[1] for r in prefill]),
                    "gqa sdpa": ([r[0] for r in prefill], [r[2] for r in prefill]),
                },
            },
            {
                "title": "Decode per token",
                "xlabel": "context tokens",
                "ylabel": "ms",
                "series": {
                    "lightning": ([r[0] for r in decode], [r[1] for r in decode]),
                    "gqa sdpa": ([r[0] for r in decode], [r[2] for r in decode]),
                },
            },
            {
                "title": "vs MiniMax: 256-token continuation",
                "xlabel": "cached tokens",
                "ylabel": "ms",
                "series": {
                    "ours": ([r[0] for r in versus], [r[4] for r in versus]),
                    "MiniMax": ([r[0] for r in versus], [r[5] for r in versus]),
                },
            },
        ],
    )
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
