#!/usr/bin/env bash
# Coverage-guided fuzzing of the loader's CHESS checks (native/src/chess-check.cpp) with libFuzzer,
# for a bounded time: clang build of ggml-base/ggml-cpu + our checks with ASan and UBSan in
# build/fuzz-cmake, seeds from scripts/fuzz-seeds.py, corpus kept in build/fuzz-corpus.
# Usage: scripts/test-fuzz.sh LLAMA_SRC [SECONDS]   (installs Debian's clang when missing)
set -euo pipefail
src=$1
secs=${2:-${FUZZ_SECONDS:-60}}
bld=build/fuzz-cmake
corpus=build/fuzz-corpus
py=${VPY:-.venv/bin/python}

if ! command -v clang++ >/dev/null 2>&1; then
    echo "installing Debian's clang (libFuzzer)"
    apt-get update -qq && apt-get install -y -qq clang >/dev/null
fi

# -fno-sanitize=enum: stock gguf.cpp reads a file's type field straight into `enum gguf_type` and
# rejects unknown values afterwards (its switch default); UBSan would stop at that load.
flags="-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize=enum -fno-sanitize-recover=all"
launcher=()
if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
CC=clang CXX=clang++ cmake -S "$src" -B "$bld" -G Ninja -DCMAKE_BUILD_TYPE=None \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DCHESS_NATIVE_DIR="$PWD/native" -DCHESS_FUZZ=ON "${launcher[@]}" >/dev/null
cmake --build "$bld" -j "${JOBS:-2}" --target fuzz-chess-check

mkdir -p "$corpus"
"$py" scripts/fuzz-seeds.py "$corpus"
# -max_len fits the largest seed; leaks and >2 GB of memory count as findings, like crashes.
# FUZZ_SEED (default 1) makes a CI run replay the same mutations (a gate must not flake on what a
# random seed happens to reach); FUZZ_SEED=0 picks a random seed for exploratory runs.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$bld/bin/fuzz-chess-check" "$corpus" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
    -timeout=10 -seed="${FUZZ_SEED:-1}" -print_final_stats=1 -artifact_prefix=build/fuzz- 2>&1 | tail -25
echo "fuzz-chess-check: no finding in ${secs} s (corpus: $(ls "$corpus" | wc -l) inputs in $corpus)"
