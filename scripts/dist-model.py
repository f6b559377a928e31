#!/usr/bin/env python3
"""A model of a data-parallel update's time for a 7B LLaMA (LLaMA-2-7B's shape) at 8, 64 and 512
ranks, for SpIEL-AG, SpIEL-MA, LoRA and full fine-tuning, from the volumes spiel all-reduces per
update (docs/distributed.md states the formulas) and a measured all-reduce bandwidth and latency.

    scripts/dist-model.py --bus-gbs 1.6 --latency-us 7 --rank-gflops 71

--bus-gbs and --latency-us come from `spiel bench all-reduce` (its bus GB/s at the largest size and
its time at the smallest); --rank-gflops from `spiel bench train` (GFLOP/s of one rank). Prints
Markdown tables. A model, not a measurement: every input is printed with the table.
"""
import argparse
import math

# LLaMA-2-7B: hidden 4096, intermediate 11008, 32 layers, vocab 32000, untied embeddings.
H, I, L, V = 4096, 11008, 32, 32000
SHAPES = [(H, H)] * 4 + [(I, H), (I, H), (H, I)]  # q k v o gate up down: (out, in)
N_LIN = L * sum(o * i for o, i in SHAPES)
N_ALL = N_LIN + 2 * V * H + (2 * L + 1) * H
RANK = 8
BUDGET = L * sum(RANK * (o + i) for o, i in SHAPES)  # LoRA r=8 on all seven = the sparse budget
MODULES = 7 * L


def volumes(s, a):
    """Bytes all-reduced per update (averaged over a reselection cycle of s updates, a of them in
    the AG window) and collective calls per update, by method."""
    f = 4  # f32
    return {
        # value gradients every update; the window's candidate gradients on a of every s updates;
        # once per cycle the dense gradient of every module, for the candidate choice.
        "spiel-ag": (f * BUDGET * (1 + a / s) + f * N_LIN / s, MODULES * (1 + a / s + 2 / s)),
        # value gradients; SM3's accumulators follow from the summed gradient, nothing more.
        "spiel-ma": (f * BUDGET, MODULES),
        "lora": (f * BUDGET, 2 * MODULES),
        "full": (f * N_ALL, 2 * L * 9 + 3),
    }


def allreduce_s(nbytes, calls, p, bus, lat):
    """Bandwidth-optimal all-reduce: 2 (p - 1) / p of the payload through each link, and a
    latency of 2 log2(p) hops per call."""
    return 2 * (p - 1) / p * nbytes / bus + calls * 2 * math.log2(p) * lat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bus-gbs", type=float, required=True, help="all-reduce bus bandwidth, GB/s")
    ap.add_argument("--latency-us", type=float, required=True, help="one small all-reduce, us")
    ap.add_argument("--rank-gflops", type=float, required=True, help="training GFLOP/s of one rank")
    ap.add_argument("--global-batch", type=int, default=512, help="sequences per update")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1000, help="updates in the run (sets S and A)")
    args = ap.parse_args()
    s = max(8, args.steps // 10)
    a = max(1, s // 4)
    bus, lat = args.bus_gbs * 1e9, args.latency_us * 1e-6
    tokens = args.global_batch * args.seq_len
    print(
        f"7B (LLaMA-2-7B shape: {N_ALL / 1e9:.2f} B parameters, {N_LIN / 1e9:.2f} B in the projections); "
        f"budget {BUDGET / 1e6:.1f} M (LoRA r = 8 on all seven projections); {args.steps} updates, "
        f"S = {s}, A = {a}; {args.global_batch} x {args.seq_len} tokens per update split over the ranks; "
        f"bus {args.bus_gbs} GB/s, latency {args.latency_us} us per hop, {args.rank_gflops} GFLOP/s per rank\n"
    )
    print("| method | MB all-reduced per update | p | compute s | all-reduce s | update s | communication share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, (nbytes, calls) in volumes(s, a).items():
        # frozen base: forward + input gradient (4 N per token); full adds the weight gradients (6 N).
        flops = (6 if method == "full" else 4) * N_ALL * tokens
        for p in (8, 64, 512):
            comp = flops / p / (args.rank_gflops * 1e9)
            comm = allreduce_s(nbytes, calls, p, bus, lat)
            print(
                f"| {method} | {nbytes / 1e6:,.0f} | {p} | {comp:,.1f} | {comm:,.2f} | {comp + comm:,.1f} | {100 * comm / (comp + comm):.1f}% |"
            )


if __name__ == "__main__":
    main()
