#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (build-fuzz/, everything under ASan + UBSan) and runs
# each for SECONDS (default 600), JOBS at a time (default 1), on a copy of its seed corpus.
# Crashes land in runs/fuzz/<target>/ (crash-*, leak-*, timeout-*); each found one belongs in
# tests/fuzz/regressions/<target>/ once fixed (test_fuzz_corpus replays them). See docs/fuzzing.md.
#
#   bash scripts/fuzz.sh [SECONDS] [JOBS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
jobs=${2:-1}
shift $(($# > 2 ? 2 : $#))
targets=("$@")
((${#targets[@]})) || targets=(pth pickle safetensors checkpoint idx arch image)

command -v clang++ >/dev/null || { echo "fuzz: clang++ missing (apt-get install clang libomp-dev)"; exit 1; }
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_COMPILER=clang \
  -DCMAKE_CXX_COMPILER=clang++ -DDPTRAIN_FUZZ=ON -DDPTRAIN_CUDA=OFF -DDPTRAIN_TESTS=OFF \
  -DDPTRAIN_BENCHMARKS=OFF >/dev/null
cmake --build build-fuzz --target "${targets[@]/#/fuzz_}"

run_one() {
  local t=$1 dir=runs/fuzz/$1
  mkdir -p "$dir/corpus"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    build-fuzz/tests/fuzz/fuzz_"$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
    -print_final_stats=1 -artifact_prefix="$dir/" "$dir/corpus" tests/fuzz/corpus/"$t" \
    >"$dir/log.txt" 2>&1 || true
  local execs crashes
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$dir/log.txt" | grep -o '[0-9]*$' || echo 0)
  crashes=$(find "$dir" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
  echo "fuzz_$t: ${seconds} s, ${execs:-0} executions, $crashes crashing inputs (log: $dir/log.txt)"
}

running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if ((running >= jobs)); then
    wait -n
    running=$((running - 1))
  fi
done
wait
