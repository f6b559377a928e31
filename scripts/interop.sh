#!/usr/bin/env bash
# spiel's files in stock transformers and PEFT (bench/peers/interop.py), on the default model.
#
#   scripts/interop.sh        # about 5 minutes on 2 cores after the peers' set-up
#
# Trains a short LoRA run and a short SpIEL-AG run with budget_split = "lora" (the counts PEFT's
# SHiRA adapters hold), exports the model (`spiel export --to hf`), merges the LoRA adapter,
# exports the SpIEL-AG adapter as SHiRA (`spiel export --to peft`), scores one text with spiel
# for each, then loads every file in transformers / PEFT and compares. Work files go to
# runs/interop/. Uses bench/peers/.venv (set up as scripts/bench-peers.sh does) and, for the
# older transformers 4.37 / tokenizers 0.15, bench/peers/.venv-old. Not a test.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=bench/peers/.venv
W=runs/interop
TEXT=${TEXT:-"The capital of France is Paris. The capital of Italy is"}
. scripts/peers-env.sh
peers_env "$VENV" bench/peers/requirements.txt "torch, transformers, peft"
mkdir -p "$W"
train() {  # method out extra-flags...
    local method=$1 out=$2
    shift 2
    if [ ! -f "$out/summary.json" ]; then
        "$SPIEL" train --method "$method" --steps 6 --eval-every 0 --save-every 0 --out "$out" "$@"
    fi
}
train lora "$W/run-lora"
train spiel-ag "$W/run-ag" --budget-split lora
rm -rf "$W/hf" "$W/merged" "$W/lora" "$W/shira"
"$SPIEL" export --to hf "$W/hf"
"$SPIEL" merge --adapter "$W/run-lora/adapter" --out "$W/merged"
cp -r "$W/run-lora/adapter" "$W/lora"
"$SPIEL" export --to peft --adapter "$W/run-ag/adapter" "$W/shira"
"$SPIEL" score --json --top-k 10 --text "$TEXT" > "$W/score-base.json"
"$SPIEL" score --json --top-k 10 --text "$TEXT" --adapter "$W/lora" > "$W/score-lora.json"
"$SPIEL" score --json --top-k 10 --text "$TEXT" --adapter "$W/run-ag/adapter" > "$W/score-ag.json"
OMP_NUM_THREADS=2 "$VENV/bin/python" bench/peers/interop.py --dir "$W" --text "$TEXT"
# The same export in the older stack the paper's fork pins.
OLD=bench/peers/.venv-old
peers_env "$OLD" bench/peers/requirements-old.txt "torch, transformers"
echo
OMP_NUM_THREADS=2 "$OLD/bin/python" bench/peers/interop_old.py "$W" "$TEXT"
