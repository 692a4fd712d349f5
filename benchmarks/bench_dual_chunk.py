"""Dual Chunk Attention speed and memory, side by side in one run (prints tables, saves
benchmarks/results/dual_chunk.png).

1. Prefill time and peak memory vs sequence length: one DCA layer (tiled flash path with log-sum-exp merge) vs one
   softmax GQA layer with plain causal SDPA, same shapes (hidden 256, 8 heads, 2 kv heads, head_dim 32), batch 1.
   Both timings include the q/k/v/o projections and the RoPE tables. For reference, the exact selected-scores path
   of the DCA layer (`reference`, query tiles of 256 rows) up to 2k.
2. Decode time per token vs context length, with a DynamicCache filled to that length.

DCA setting: chunk_size 2048, local_size 256 (the config default chunk_size // 8), so c = 1792 and 8k tokens span 5
chunks (16k: 10), i.e. every part (intra, succ, inter) is exercised.

Peak memory is the peak of torch's live CPU allocations during one prefill above the level at its start, from the
torch profiler's memory accounting (`profile_memory=True`; see `peak_memory_mib`).

Target on 2 CPU cores: DCA prefill at 8k <= 1.5x the SDPA layer's time.

    python benchmarks/bench_dual_chunk.py            # full run (lengths 1k ... 16k)
    python benchmarks/bench_dual_chunk.py --quick    # a short smoke run
"""

import argparse
import os
import statistics
import time


os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (memory measurement) is chatty otherwise

import torch  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from common import median_seconds, print_table, save_plot  # noqa: E402
from configuration import DecoderOnlyConfig  # noqa: E402
from modeling.dual_chunk_attention import DecoderOnlyDualChunkAttention  # noqa: E402
from modeling.gqa_attention import DecoderOnlyAttention  # noqa: E402
from modeling.layers import DecoderOnlyRotaryEmbedding  # noqa: E402


HIDDEN, HEADS, KV_HEADS = 256, 8, 2
CHUNK_SIZE, LOCAL_SIZE = 2048, 256
REFERENCE_MAX_TOKENS = 2048


def build_layers():
    common = {"hidden_size": HIDDEN, "num_heads": HEADS, "num_kv_heads": KV_HEADS, "num_layers": 1, "dropout": 0.0}
    dca_config = DecoderOnlyConfig(
        attention_type="dual_chunk", chunk_size=CHUNK_SIZE, local_size=LOCAL_SIZE, attn_implementation="sdpa", **common
    )
    gqa_config = DecoderOnlyConfig(attn_implementation="sdpa", **common)
    dca = DecoderOnlyDualChunkAttention(dca_config, layer_idx=0).eval()
    gqa = DecoderOnlyAttention(gqa_config, layer_idx=0).eval()
    gqa.load_state_dict(dca.state_dict())
    return dca, gqa, DecoderOnlyRotaryEmbedding(gqa_config)


def prefill_fns(dca, gqa, rotary, hidden):
    position_ids = torch.arange(hidden.shape[1])[None]

    def run_dca():
        return dca(hidden, position_ids=position_ids)

    def run_reference():
        dca.fast_path_min_tokens = 10**12
        try:
            return dca(hidden, position_ids=position_ids)
        finally:
            dca.fast_path_min_tokens = DecoderOnlyDualChunkAttention.fast_path_min_tokens

    def run_sdpa():  # mask None: transformers' sdpa path runs with is_causal=True
        return gqa(hidden, position_embeddings=rotary(hidden, position_ids), attention_mask=None)

    return {"dca": run_dca, "reference": run_reference, "sdpa": run_sdpa}


def paired_median_seconds(fns: dict, repeats: int, warmup: int = 1) -> tuple[dict, float | None]:
    """Median wall time per function, timed interleaved (a, b, c, a, b, c, ...) so that load from other processes
    hits all of them alike; also the median of the per-round ratios dca / sdpa (robust on a shared machine)."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    ratio = None
    if "dca" in times and "sdpa" in times:
        ratio = statistics.median(a / b for a, b in zip(times["dca"], times["sdpa"]))
    return {name: statistics.median(t) for name, t in times.items()}, ratio


def peak_memory_mib(fn) -> float:
    """Peak of torch's live CPU allocations during `fn()` above the level at its start.

    The profiler (`profile_memory=True`) attributes to every op the net memory it allocated itself (outputs kept,
    temporaries freed) and records frees outside ops as `[memory]` events; summed in time order this is the live
    memory curve. Scratch buffers allocated and freed inside one kernel (e.g. the flash kernels' blocks) are not
    seen; every tensor an op returns is."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def decode_seconds(layer, context: int, repeats: int, rotary=None) -> float:
    """Median time of one new token over a cache holding `context` tokens (cropped back after every step)."""
    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    head_dim = HIDDEN // HEADS
    keys = torch.randn(1, KV_HEADS, context, head_dim, generator=generator)
    cache.update(keys, torch.randn(1, KV_HEADS, context, head_dim, generator=generator), 0)
    token = torch.randn(1, 1, HIDDEN, generator=generator)
    position_ids = torch.tensor([[context]])

    def step():
        if rotary is None:
            layer(token, position_ids=position_ids, cache=cache)
        else:
            layer(token, position_embeddings=rotary(token, position_ids), attention_mask=None, cache=cache)
        cache.crop(-1)

    return median_seconds(step, repeats=repeats, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths 1k, 2k, 4k and fewer repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is for 2 cores)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    repeats = 3 if args.quick else 7
    dca, gqa, rotary = build_layers()

    prefill_rows, memory_rows, ratios = [], [], []
    times = {"dca": [], "sdpa": [], "reference": []}
    memory = {"dca": [], "sdpa": [], "reference": []}
    for length in lengths:
        hidden = torch.randn(1, length, HIDDEN)
        fns = prefill_fns(dca, gqa, rotary, hidden)
        with torch.no_grad():
            torch.testing.assert_close(fns["dca"]()[0], fns["reference"]()[0], rtol=1e-4, atol=1e-4)
        names = ["dca", "sdpa"] + (["reference"] if length <= REFERENCE_MAX_TOKENS else [])
        medians, ratio = paired_median_seconds({"dca": fns["dca"], "sdpa": fns["sdpa"]}, repeats=repeats)
        if "reference" in names:  # ~10x slower: two timed runs are enough to show it
            medians["reference"] = median_seconds(fns["reference"], repeats=2, warmup=0)
        for name in names:
            times[name].append(medians[name])
            memory[name].append(peak_memory_mib(fns[name]))
        ratios.append(ratio)
        ref_time = f"{times['reference'][-1] * 1e3:.1f}" if "reference" in names else "-"
        ref_mem = f"{memory['reference'][-1]:.1f}" if "reference" in names else "-"
        prefill_rows.append(
            [length, times["dca"][-1] * 1e3, times["sdpa"][-1] * 1e3, times["dca"][-1] / times["sdpa"][-1], ratio,
             ref_time]
        )  # fmt: skip
        memory_rows.append([length, memory["dca"][-1], memory["sdpa"][-1], ref_mem])
        print(f"  prefill {length}: done", flush=True)

    decode_rows, decode = [], {"dca": [], "sdpa": []}
    for length in lengths:
        decode["dca"].append(decode_seconds(dca, length, repeats * 4))
        decode["sdpa"].append(decode_seconds(gqa, length, repeats * 4, rotary=rotary))
        decode_rows.append([length, decode["dca"][-1] * 1e3, decode["sdpa"][-1] * 1e3, decode["dca"][-1] / decode["sdpa"][-1]])

    setting = f"hidden {HIDDEN}, {HEADS} heads, {KV_HEADS} kv heads, chunk_size {CHUNK_SIZE}, local_size {LOCAL_SIZE}"
    print_table(
        f"Prefill, one layer, batch 1 ({setting}); median of {repeats} interleaved runs, {args.threads} threads",
        ["tokens", "DCA ms", "SDPA causal ms", "DCA / SDPA", "paired ratio", "DCA reference ms"],
        prefill_rows,
    )
    print_table(
        "Prefill peak memory above the inputs (MiB, torch CPU allocations)",
        ["tokens", "DCA", "SDPA causal", "DCA reference"],
        memory_rows,
    )
    print_table("Decode, one token over a cache of N tokens", ["context", "DCA ms", "SDPA ms", "DCA / SDPA"], decode_rows)
    if 8192 in lengths:
        i = lengths.index(8192)
        ratio = times["dca"][i] / times["sdpa"][i]
        verdict = "OK" if ratio <= 1.5 else "MISSED"
        print(
            f"\n8k prefill DCA / SDPA causal: {ratio:.2f} from the medians, {ratios[i]:.2f} median paired ratio "
            f"(target <= 1.5: {verdict}; {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})"
        )

    short = lengths[: len(times["reference"])]
    path = save_plot(
        "dual_chunk",
        [
            {"title": "Prefill time (one layer)", "xlabel": "tokens", "ylabel": "seconds",
             "series": {"DCA (flash + LSE)": (lengths, times["dca"]), "SDPA causal": (lengths, times["sdpa"]),
                        "DCA reference": (short, times["reference"])}},
            {"title": "Prefill peak memory", "xlabel": "tokens", "ylabel": "MiB",
             "series": {"DCA (flash + LSE)": (lengths, memory["dca"]), "SDPA causal": (lengths, memory["sdpa"]),
                        "DCA reference": (short, memory["reference"])}},
            {"title": "Decode time per token", "xlabel": "context tokens", "ylabel": "seconds",
             "series": {"DCA": (lengths, decode["dca"]), "SDPA": (lengths, decode["sdpa"])}},
        ],
    )  # fmt: skip
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
