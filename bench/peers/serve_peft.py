"""The PyTorch peer of `spiel bench serve`: transformers + PEFT generating one batch whose rows use
different LoRA adapters (PEFT's mixed-adapter batches, `generate(..., adapter_names=[...])`).

The same workload as spiel's benchmark: --clients rows, a prompt of about --prompt-tokens tokens
(the same text), --output-tokens new tokens per row (greedy, end-of-turn ignored), rows' adapters
drawn uniformly from --adapters random LoRA adapters (rank 8 on the seven projections, the default
SpIEL budget's LoRA). Scenarios: the base alone, one adapter for every row, and each K mixed.
Prints JSON: one object per scenario with generated tokens/s over --rounds batches (median).
"""

import argparse
import json
import random
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a Hugging Face directory (spiel export --to hf)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--adapters", default="8,64")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    base.eval()
    ks = [int(k) for k in args.adapters.split(",")]
    most = max(ks + [1])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name="ad0")
    for i in range(1, most):
        model.add_adapter(f"ad{i}", cfg)
    model.eval()

    words = "the quick brown fox jumps over a lazy dog "
    prompt = words * max(1, -(-args.prompt_tokens // 9))
    batch = tok([prompt] * args.clients, return_tensors="pt", padding=True)

    def run(names):
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    adapter_names=names,
                    max_new_tokens=args.output_tokens,
                    min_new_tokens=args.output_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            times.append(time.perf_counter() - t)
            assert out.shape[1] - batch["input_ids"].shape[1] == args.output_tokens
        return args.clients * args.output_tokens / statistics.median(times)

    rng = random.Random(0)
    rows = [{"scenario": "base alone", "tokens_per_s": run(["__base__"] * args.clients)}]
    rows.append({"scenario": "one adapter", "tokens_per_s": run(["ad0"] * args.clients)})
    for k in ks:
        names = [f"ad{rng.randrange(k)}" for _ in range(args.clients)]
        rows.append({"scenario": f"{k} adapters mixed (uniform)", "tokens_per_s": run(names)})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
