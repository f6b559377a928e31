"""The PyTorch peers of `spiel bench train` and `spiel bench generate`.

Runs the same workload as spiel's benchmarks on the same model (a Hugging Face directory, e.g. the
one `spiel export --to hf` writes): synthetic sequences of exactly --seq-len tokens, all predicted,
batches of --batch-size, --dtype, --threads threads; one warm-up step, then --steps measured steps.
Prints JSON with the fields spiel prints (method, median_s, mean_cycle_s, tokens_per_s, gflops,
peak_rss_mib), so scripts/bench-peers.sh can put both in one table.

Methods: `full` (every weight trained, AdamW) and `lora` (PEFT LoRA r=8, alpha 16, on q, k, v, o,
gate, up and down, AdamW); `generate` measures prefill and greedy decode tokens/s with
transformers' generate. Run one method per process, so each peak RSS is that method's own.

--dtype bf16 is PyTorch's mixed precision on a CPU, as spiel's `--dtype bf16` computes: products
and activations in bf16 under torch.autocast, f32 master weights for full fine-tuning, a bf16
frozen base under f32 LoRA adapters (PEFT keeps adapters in f32), a bf16 model for generation.
"""

import argparse
import json
import resource
import statistics
import time


def tokens(vocab, batch, seq):
    # The ids spiel's bench uses: 300 + (i * 7919 + e * 104729) mod (vocab - 300).
    return [[300 + (i * 7919 + e * 104_729) % (vocab - 300) for i in range(seq)] for e in range(batch)]


def train_flops(cfg, n_tokens, seq, full):
    # The same count as spiel::bench::train_flops.
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = cfg.num_key_value_heads * head_dim
    per_layer = h * q * 2 + 2 * h * kv + 3 * h * cfg.intermediate_size
    blocks = per_layer * cfg.num_hidden_layers
    head = h * cfg.vocab_size
    bwd = 4.0 if full else 2.0
    attn = 4.0 * n_tokens * seq / 2.0 * q * cfg.num_hidden_layers
    return (2.0 + bwd) * (blocks + head) * n_tokens + 3.0 * attn


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_train(args, torch, model, method):
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.tensor(tokens(model.config.vocab_size, args.batch_size, args.seq_len))
    times = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        with autocast:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        secs = time.perf_counter() - t0
        if step > 0:
            times.append(secs)
    med = statistics.median(times)
    n_tokens = args.batch_size * args.seq_len
    flops = train_flops(model.config, n_tokens, args.seq_len, method == "full")
    return {
        "method": method,
        "dtype": args.dtype,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "mean_cycle_s": med,
        "tokens_per_s": n_tokens / med,
        "flops_per_step": flops,
        "gflops": flops / med / 1e9,
        "peak_rss_mib": peak_rss_mib(),
        "trainable": sum(p.numel() for p in params),
    }


def bench_generate(args, torch, model):
    model.eval()
    prompt = torch.tensor(tokens(model.config.vocab_size, 1, args.prompt_tokens)[:1])
    prefill, decode = [], []
    with torch.no_grad():
        for r in range(args.rounds + 1):
            t0 = time.perf_counter()
            model(input_ids=prompt, use_cache=True)
            t1 = time.perf_counter()
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.decode_tokens,
                min_new_tokens=args.decode_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            t2 = time.perf_counter()
            if r > 0:
                prefill_s = t1 - t0
                prefill.append(args.prompt_tokens / prefill_s)
                # generate = one prefill + the decode steps.
                decode.append(args.decode_tokens / max((t2 - t1) - prefill_s, 1e-9))
    return {
        "method": "generate",
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "peak_rss_mib": peak_rss_mib(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--method", required=True, choices=["full", "lora", "generate"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # bf16: the frozen base (LoRA, generation) is held in bf16; full fine-tuning keeps f32
    # master weights and computes in bf16 under autocast.
    held = torch.bfloat16 if args.dtype == "bf16" and args.method != "full" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=held)
    if args.method == "generate":
        row = bench_generate(args, torch, model)
    else:
        row = bench_train(args, torch, model, args.method)
    row["torch"] = torch.__version__
    row["threads"] = torch.get_num_threads()
    print(json.dumps([row]))


if __name__ == "__main__":
    main()
