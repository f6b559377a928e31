"""The exported model in an older Hugging Face stack (transformers 4.37, tokenizers 0.15, the
releases the paper's PEFT fork pins): it must load spiel's model.safetensors (which needs the
`format: pt` header tag) and tokenizer.json (which needs merges as "a b" strings), and give
spiel's logits. Usage: interop_old.py DIR TEXT, with DIR as scripts/interop.sh fills it.
"""

import json, sys, torch, transformers, tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
tok = AutoTokenizer.from_pretrained(f"{d}/hf")
m = AutoModelForCausalLM.from_pretrained(f"{d}/hf", torch_dtype=torch.float32).eval()
spiel = json.load(open(f"{d}/score-base.json"))
text = sys.argv[2]
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
with torch.no_grad():
    logits = m(ids).logits[0, -1]
diff = max(abs(float(logits[t["id"]]) - t["logit"]) for t in spiel["top"])
ok = ids[0].tolist() == spiel["ids"] and torch.topk(logits, len(spiel["top"])).indices.tolist() == [t["id"] for t in spiel["top"]] and diff <= 2e-4
print("same ids:", ids[0].tolist() == spiel["ids"], " same top-k:", torch.topk(logits, len(spiel["top"])).indices.tolist() == [t["id"] for t in spiel["top"]], f" largest logit difference {diff:.2e}")
sys.exit(0 if ok else 1)
