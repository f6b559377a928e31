#!/usr/bin/env bash
# Data-parallel scaling on one machine: `spiel bench train` as 1 process x 2 threads against
# `mpirun -n 2` x 1 thread, alternately (A B A B ...), per method.
#
#   scripts/bench-dist.sh                          # spiel-ag,lora,full, 3 rounds, 20 updates
#   METHODS=spiel-ag ROUNDS=5 scripts/bench-dist.sh
#
# Needs a build with `--features mpi` (target/release/spiel) and Open MPI. Prints, per method and
# layout, the median over rounds of the median seconds per update and of its communication, and
# the throughput of 2 x 1 relative to 1 x 2. Raw JSON goes to runs/bench-dist/. A benchmark, not a
# test: run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-20}
METHODS=${METHODS:-spiel-ag,lora,full}
SPIEL=${SPIEL:-target/release/spiel}
OUT=runs/bench-dist
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for m in ${METHODS//,/ }; do
    for r in $(seq 1 "$ROUNDS"); do
        echo "$m round $r of $ROUNDS: 1 rank x 2 threads" >&2
        "$SPIEL" --threads 2 bench train --json --methods "$m" --steps "$STEPS" > "$OUT/$m-1x2-$r.json"
        echo "$m round $r of $ROUNDS: 2 ranks x 1 thread" >&2
        mpirun -n 2 --bind-to none "$SPIEL" --threads 1 bench train --json --methods "$m" --steps "$STEPS" \
            > "$OUT/$m-2x1-$r.json"
    done
done
python3 - "$OUT" "$ROUNDS" "$METHODS" <<'PY'
import json, statistics, sys
out, rounds, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
print(f"median over {rounds} rounds of each run's median s/update")
print("| method | layout | s/update | communication s | MB all-reduced | updates/s vs 1 x 2 |")
print("|---|---|---:|---:|---:|---:|")
for m in methods:
    med = {}
    for lay in ["1x2", "2x1"]:
        rows = [json.load(open(f"{out}/{m}-{lay}-{r}.json"))[0] for r in range(1, rounds + 1)]
        s = statistics.median(r["median_s"] for r in rows)
        c = statistics.median(r.get("comm_s", 0.0) for r in rows)
        b = statistics.median(r.get("comm_bytes", 0.0) for r in rows)
        med[lay] = s
        ratio = med["1x2"] / s
        name = {"1x2": "1 rank x 2 threads", "2x1": "2 ranks x 1 thread"}[lay]
        print(f"| {m} | {name} | {s:.3f} | {c:.4f} | {b / 1e6:.2f} | {ratio:.2f}x |")
PY
