"""spiel's files in stock transformers and PEFT: logits against `spiel score`, and generation.

Reads the directory scripts/interop.sh fills:
  hf/      `spiel export --to hf` of the default model
  merged/  `spiel merge` of the LoRA adapter
  lora/    a LoRA adapter trained by spiel (PEFT's LoRA format)
  shira/   `spiel export --to peft` of a SpIEL-AG adapter trained with budget_split = "lora"
  score-*.json  `spiel score --json --top-k K` for the same text, with and without each adapter

For each case it loads the model (and adapter) the way a user of transformers / PEFT would, takes
the logits after the text, and compares the top-k tokens and their logits with spiel's; then
greedy-generates an answer to a chat prompt on hf/ and checks that it stops at the end of the
turn (generation_config.json's eos) well before max_new_tokens. Prints one markdown table; exits
non-zero when a check fails.
"""

import argparse
import json
import os
import sys

import torch
import transformers
import peft
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def last_logits(model, tok, text):
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return ids[0].tolist(), model(ids).logits[0, -1].float()


def compare(name, model, tok, text, score_path, tol):
    spiel = json.load(open(score_path))
    ids, logits = last_logits(model, tok, text)
    same_ids = ids == spiel["ids"]
    top = torch.topk(logits, len(spiel["top"]))
    spiel_ids = [t["id"] for t in spiel["top"]]
    diff = max(abs(float(logits[t["id"]]) - t["logit"]) for t in spiel["top"])
    ok = same_ids and top.indices.tolist() == spiel_ids and diff <= tol
    return ok, f"| {name} | {'yes' if same_ids else 'NO'} | {'yes' if top.indices.tolist() == spiel_ids else 'NO'} | {diff:.2e} | {'ok' if ok else 'FAIL'} |"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--tol", type=float, default=2e-4)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    d = a.dir
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}\n")
    print("| case | same token ids | same top-k | largest logit difference | |")
    print("|---|---|---|---:|---|")
    results = []
    tok = AutoTokenizer.from_pretrained(f"{d}/hf")
    base = AutoModelForCausalLM.from_pretrained(f"{d}/hf", dtype=torch.float32).eval()
    results.append(compare("exported model (`spiel export --to hf`)", base, tok, a.text, f"{d}/score-base.json", a.tol))
    merged = AutoModelForCausalLM.from_pretrained(f"{d}/merged", dtype=torch.float32).eval()
    results.append(compare("merged LoRA (`spiel merge`)", merged, tok, a.text, f"{d}/score-lora.json", a.tol))
    del merged
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{d}/hf", dtype=torch.float32), f"{d}/lora").eval()
    results.append(compare("spiel LoRA adapter in PEFT", lora, tok, a.text, f"{d}/score-lora.json", a.tol))
    del lora
    shira = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{d}/hf", dtype=torch.float32), f"{d}/shira").eval()
    results.append(compare("SpIEL-AG as PEFT SHiRA (`spiel export --to peft`)", shira, tok, a.text, f"{d}/score-ag.json", a.tol))
    del shira
    for ok, row in results:
        print(row)

    # Greedy generation on the exported directory stops at the end of the turn.
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    limit = 64
    with torch.no_grad():
        out = base.generate(ids, max_new_tokens=limit, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    eos = base.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    stopped = len(new) < limit and new[-1] in eos
    answer = tok.decode(new, skip_special_tokens=False)
    print(f"\ngreedy generate on hf/ (max_new_tokens {limit}): {len(new)} new tokens, "
          f"last id {new[-1]} (eos {eos}): {'stopped at the end of the turn' if stopped else 'DID NOT STOP'}")
    print(f"answer: {answer!r}")
    if not (stopped and all(ok for ok, _ in results)):
        sys.exit(1)


if __name__ == "__main__":
    main()
