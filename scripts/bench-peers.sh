#!/usr/bin/env bash
# spiel against the PyTorch peers (torch + transformers + PEFT), side by side on this machine.
#
#   scripts/bench-peers.sh            # 3 rounds, 2 threads each
#   ROUNDS=5 STEPS=20 scripts/bench-peers.sh
#   DTYPE=bf16 scripts/bench-peers.sh   # both sides in bf16 mixed precision
#
# Sets up bench/peers/.venv from bench/peers/requirements.txt (pinned), exports the default model
# to a Hugging Face directory, then runs spiel and the peers alternately (A B A B ..., ROUNDS
# rounds), each method in its own process, and prints one table with the medians over rounds and
# the ratios spiel / peer. Raw JSON of every run goes to runs/bench-peers/$DTYPE/. A benchmark, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
STEPS=${STEPS:-10}             # measured spiel updates per method (one reselection cycle of S=10)
PEER_STEPS=${PEER_STEPS:-5}    # measured PyTorch steps per method (every step is alike there)
BATCH=${BATCH:-4}
SEQ=${SEQ:-256}
DTYPE=${DTYPE:-f32}            # f32, or bf16 (spiel --dtype bf16 against torch.autocast bf16)
# spiel's --dtype applies to adapter methods (full fine-tuning trains in f32): no full row in bf16.
if [ "$DTYPE" = bf16 ]; then METHODS="spiel-ag spiel-ma lora"; else METHODS="spiel-ag spiel-ma lora full"; fi
OUT=runs/bench-peers/$DTYPE
MODEL_DIR=runs/bench-peers/model
VENV=bench/peers/.venv

. scripts/peers-env.sh
peers_env "$VENV" bench/peers/requirements.txt "torch, transformers, peft"
mkdir -p "$OUT"
peers_model "$MODEL_DIR"

export OMP_NUM_THREADS=$THREADS
run_spiel_train() {
    "$SPIEL" --threads "$THREADS" bench train --json --methods "$1" --batch-size "$BATCH" \
        --seq-len "$SEQ" --steps "$STEPS" --reselection-steps 10 --dtype "$DTYPE"
}
run_peer() {
    "$VENV/bin/python" bench/peers/bench.py --model "$MODEL_DIR" --method "$1" --threads "$THREADS" \
        --batch-size "$BATCH" --seq-len "$SEQ" --steps "$PEER_STEPS" --dtype "$DTYPE"
}

for r in $(seq 1 "$ROUNDS"); do
    echo "round $r of $ROUNDS" >&2
    for m in $METHODS; do
        echo "  spiel $m" >&2
        run_spiel_train "$m" > "$OUT/spiel-$m-$r.json"
        case $m in
            lora | full)
                echo "  peer $m" >&2
                run_peer "$m" > "$OUT/peer-$m-$r.json"
                ;;
        esac
    done
    echo "  spiel generate" >&2
    "$SPIEL" --threads "$THREADS" bench generate --json --dtype "$DTYPE" > "$OUT/spiel-generate-$r.json"
    echo "  peer generate" >&2
    run_peer generate > "$OUT/peer-generate-$r.json"
done

"$VENV/bin/python" - "$OUT" "$ROUNDS" "$METHODS" <<'EOF'
import json, statistics, sys
out, rounds, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()

def rows(name):
    loaded = [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, rounds + 1)]
    return [x[0] if isinstance(x, list) else x for x in loaded]

def med(name, field):
    return statistics.median(row[field] for row in rows(name))

print(f"| method | spiel s/step | peer s/step | spiel/peer time | spiel GFLOP/s | spiel RSS MiB | peer RSS MiB | spiel/peer RSS |")
print("|---|---|---|---|---|---|---|---|")
peer_of = {"spiel-ag": "lora", "spiel-ma": "lora", "lora": "lora", "full": "full"}
for m in methods:
    p = peer_of[m]
    st, pt = med(f"spiel-{m}", "mean_cycle_s"), med(f"peer-{p}", "mean_cycle_s")
    sr, pr = med(f"spiel-{m}", "peak_rss_mib"), med(f"peer-{p}", "peak_rss_mib")
    g = med(f"spiel-{m}", "gflops")
    print(f"| {m} vs PEFT {p} | {st:.2f} | {pt:.2f} | {st / pt:.2f} | {g:.1f} | {sr:.0f} | {pr:.0f} | {sr / pr:.2f} |")
for field in ["prefill_tokens_per_s", "decode_tokens_per_s"]:
    s, p = med("spiel-generate", field), med("peer-generate", field)
    print(f"| generate {field} | {s:.1f} | {p:.1f} | spiel/peer {s / p:.2f} | | | | |")
EOF
