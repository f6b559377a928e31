#!/usr/bin/env bash
# `spiel bench serve` against its PyTorch peer (transformers + PEFT, one generate() batch whose rows
# use different LoRA adapters), alternately on this machine.
#
#   scripts/bench-serve-peers.sh                  # 3 rounds, 2 threads, 8 clients
#   ROUNDS=5 CLIENTS=16 scripts/bench-serve-peers.sh
#
# Sets up bench/peers/.venv (pinned), exports the default model to a Hugging Face directory, then
# runs spiel and the peer in turn (A B A B ...) and prints generated tokens/s per scenario (median
# over rounds) with the ratio spiel / peer. Raw JSON goes to runs/bench-serve-peers/. A benchmark,
# not a test.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CLIENTS=${CLIENTS:-8}
PROMPT=${PROMPT:-64}
OUTPUT=${OUTPUT:-64}
ADAPTERS=${ADAPTERS:-8,64}
OUT=runs/bench-serve-peers
MODEL_DIR=runs/bench-peers/model
VENV=bench/peers/.venv

. scripts/peers-env.sh
peers_env "$VENV" bench/peers/requirements.txt "torch, transformers, peft"
mkdir -p "$OUT"
peers_model "$MODEL_DIR"
export OMP_NUM_THREADS=$THREADS
for r in $(seq 1 "$ROUNDS"); do
    echo "round $r of $ROUNDS: spiel" >&2
    "$SPIEL" --threads "$THREADS" bench serve --json --clients "$CLIENTS" --requests 1 \
        --prompt-tokens "$PROMPT" --output-tokens "$OUTPUT" --adapters "$ADAPTERS" > "$OUT/spiel-$r.json"
    echo "round $r of $ROUNDS: peer" >&2
    "$VENV/bin/python" bench/peers/serve_peft.py --model "$MODEL_DIR" --clients "$CLIENTS" \
        --prompt-tokens "$PROMPT" --output-tokens "$OUTPUT" --adapters "$ADAPTERS" \
        --threads "$THREADS" > "$OUT/peer-$r.json"
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
spiel = [json.load(open(f"{out}/spiel-{r}.json"))["scenarios"] for r in range(1, rounds + 1)]
peer = [json.load(open(f"{out}/peer-{r}.json")) for r in range(1, rounds + 1)]
print("| scenario | spiel tokens/s | PEFT tokens/s | spiel / PEFT |")
print("|---|---:|---:|---:|")
for i, row in enumerate(spiel[0]):
    s = statistics.median(x[i]["tokens_per_s"] for x in spiel)
    p = statistics.median(x[i]["tokens_per_s"] for x in peer)
    print(f"| {row['scenario']} | {s:.1f} | {p:.1f} | {s / p:.2f}x |")
runs = [json.load(open(f"{out}/spiel-{r}.json")) for r in range(1, rounds + 1)]
step = [r["decode_step"] for r in runs]
b = statistics.median(x["base_ms"] for x in step)
m = statistics.median(x["mixed_ms"] for x in step)
print(f"spiel's decode step alone, {step[0]['batch']} sequences: {b:.1f} ms base, {m:.1f} ms with "
      f"{step[0]['adapters']} distinct adapters ({b / m:.2f}x); cold adapter load "
      f"{statistics.median(r['cold_load_ms'] for r in runs):.1f} ms")
PY
