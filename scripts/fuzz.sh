#!/usr/bin/env bash
# Fuzz every parser of outside input for SECONDS each (default 60) with cargo fuzz (libFuzzer,
# AddressSanitizer), one target after another, and print a table of executions and corpus size.
# Needs the nightly toolchain and `cargo install cargo-fuzz`. Crashes land in
# fuzz/artifacts/<target>/; copy each into fuzz/regressions/<target>/ so CI replays it.
#
#   scripts/fuzz.sh 600            # 10 minutes per target
#   TARGETS="gguf data" scripts/fuzz.sh 60
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
targets="${TARGETS:-gguf gguf_tokenizer config_json safetensors safetensors_index data adapter_config adapter_safetensors}"

# Same dependency versions as the main build; seeds made from the real files (fetched assets).
[ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
cargo run --release -q -p spiel --example fuzz_seeds
cargo +nightly fuzz build -O >/dev/null

printf '%-20s %8s %12s %10s %8s %s\n' target seconds executions exec/s corpus result
for t in $targets; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="fuzz/artifacts/$t/fuzz.log"
  # -rss_limit_mb / -malloc_limit_mb: an allocation the input cannot justify is a crash too.
  if cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
      -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see $log)"
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  printf '%-20s %8s %12s %10s %8s %s\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" "$corpus" "$result"
done
