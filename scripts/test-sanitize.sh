#!/usr/bin/env bash
# The CHESS kernels and the patched llama.cpp under sanitizers (`make test-sanitize`).
#
# 1. ASan + UBSan: ggml, libllama (with our patches) and native/ built with
#    LLAMA_SANITIZE_{ADDRESS,UNDEFINED} and GGML_SANITIZE_{ADDRESS,UNDEFINED} (they reach ggml-base,
#    ggml-cpu, llama, chess_kernels and the programs), Debug with C at -O1 -g1 (ggml's and our SIMD
#    code stays fast) and C++ at -O0 -g1 (libllama's C++ compiles 4x faster than at -O1 with the
#    sanitizers), GGML_NATIVE, static, into build/asan-cmake (targets test-chess-kernels and
#    llama-simple only; ccache when present).
#    Runs the kernel tests, then llama-simple on a converted SmolLM2 (32 tokens) with CHESS at
#    level 0.5: default method and dense prefill, CHESS_PREFILL=masked, CHESS_METHOD=cats; and the
#    same model in the compact layout (third argument) dense and at 0.5.
#    Leak detection is on; any UBSan report is fatal (halt_on_error).
# 2. TSan: the kernel test and native/src/chess-kernels*.c compiled with -fsanitize=thread into build/tsan,
#    linked against ggml-base/ggml-cpu of the normal build (build/cmake/bin: built by `make`).
#    Every memory access of our kernels and of the test's threads is instrumented; ggml's own
#    functions they call (vec_dot, from_float, to_float: pure functions of their arguments,
#    writing only locals or per-thread scratch) are not, which saves building ggml a third time.
# Every run must end without a sanitizer report; the kernel tests must end "N passed, 0 failed".
# UBSan suppressions for findings in stock ggml (none in our code): scripts/sanitize/ubsan.supp.
#
#   scripts/test-sanitize.sh MODEL.chess.gguf [llama.cpp source dir] [MODEL.compact.chess.gguf]
#   env: JOBS (default 2), ASAN_BLD (build/asan-cmake), TSAN_BLD (build/tsan), LIB_BLD (build/cmake),
#        SAN_TOKENS (32)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: $0 MODEL.chess.gguf [llama.cpp source dir] [MODEL.compact.chess.gguf]}
SRC=${2:-build/llama.cpp}
COMPACT=${3:-}
ABLD=${ASAN_BLD:-build/asan-cmake}
TBLD=${TSAN_BLD:-build/tsan}
LBLD=${LIB_BLD:-build/cmake}
JOBS=${JOBS:-2}
NTOK=${SAN_TOKENS:-32}
SUPP=$(pwd)/scripts/sanitize
start=$(date +%s)

[ -f "$SRC/CMakeLists.txt" ] || { echo "error: no llama.cpp tree in $SRC (run make first)" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "error: no converted model $MODEL" >&2; exit 1; }

launcher=()
cc_launch=()
if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
    cc_launch=(ccache)
fi

# Sanitizer runtime options. UBSan checks are compiled recoverable so that the suppressions file
# applies, and made fatal at run time by halt_on_error.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:suppressions=$SUPP/ubsan.supp"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"

# A sanitizer report anywhere in a log (belt and braces: every one of them also fails the exit code).
san_report() { grep -E "ERROR: (Address|Leak|Thread)Sanitizer|WARNING: ThreadSanitizer|runtime error:|SUMMARY: (Address|Undefined|Leak|Thread)" "$1" >/dev/null; }

fail=0
# run_kernel_test NAME BINARY: the kernel tests must exit 0, end "0 failed" and print no report
run_kernel_test() {
    local name=$1 bin=$2 log=$3 t0 rc=0
    t0=$(date +%s)
    "$bin" >"$log" 2>&1 || rc=$?
    local last
    last=$(grep -E "^[0-9]+ passed, [0-9]+ failed" "$log" | tail -1 || true)
    if [ $rc = 0 ] && ! san_report "$log" && [[ "$last" == *" 0 failed" ]]; then
        echo "$name: $last ($(( $(date +%s) - t0 )) s)"
    else
        echo "$name: FAILED (exit $rc, ${last:-no summary line}); log $log:"
        grep -E -A40 "Sanitizer|runtime error:|FAIL" "$log" | head -80 || tail -30 "$log"
        fail=1
    fi
}

# --- 1. ASan + UBSan build ----------------------------------------------------------------------
# configured every time (a second time takes a second): native/CMakeLists.txt globs native/src
mkdir -p "$ABLD"
if ! cmake -S "$SRC" -B "$ABLD" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
    "-DCMAKE_C_FLAGS_DEBUG=-O1 -g1" "-DCMAKE_CXX_FLAGS_DEBUG=-O0 -g1" -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_SANITIZE_ADDRESS=ON -DLLAMA_SANITIZE_UNDEFINED=ON \
    -DGGML_SANITIZE_ADDRESS=ON -DGGML_SANITIZE_UNDEFINED=ON \
    -DCHESS_NATIVE_DIR="$(pwd)/native" "${launcher[@]}" >"$ABLD/configure.log" 2>&1; then
    tail -30 "$ABLD/configure.log"
    echo "error: cmake configure of $ABLD failed" >&2
    exit 1
fi
t0=$(date +%s)
if ! cmake --build "$ABLD" -j "$JOBS" --target test-chess-kernels llama-simple >"$ABLD/build.log" 2>&1; then
    grep -E -B2 -A8 "error|FAILED" "$ABLD/build.log" | head -60 || tail -30 "$ABLD/build.log"
    echo "error: ASan+UBSan build failed (log $ABLD/build.log)" >&2
    exit 1
fi
echo "asan+ubsan build: $(( $(date +%s) - t0 )) s"

run_kernel_test "test-chess-kernels (asan+ubsan)" "$ABLD/bin/test-chess-kernels" "$ABLD/test-chess-kernels.log"

# --- CHESS generation under ASan + UBSan --------------------------------------------------------
# name, model, then environment assignments. The compact file (when given) runs every product by
# its transposed W_down/W_q/W_o through our code: the re-transposition for the prompt, the kernel
# without thresholds when dense (off), the sparse kernel at 0.5.
gen_runs=(
    "chess-0.5      $MODEL CHESS_LEVEL=0.5"
    "chess-0.5-mask $MODEL CHESS_LEVEL=0.5 CHESS_PREFILL=masked"
    "cats-0.5       $MODEL CHESS_LEVEL=0.5 CHESS_METHOD=cats"
)
if [ -n "$COMPACT" ]; then
    # crossover 4: the 13-token prompt takes the re-transposition, the decoded tokens the kernel
    gen_runs+=("compact-off $COMPACT CHESS_LEVEL=off CHESS_COMPACT_IN_MAX_TOKENS=4" "compact-0.5 $COMPACT CHESS_LEVEL=0.5")
fi
prompt="The capital of France is Paris. The capital of Germany is"
for run in "${gen_runs[@]}"; do
    read -r name model envs <<<"$run"
    log="$ABLD/llama-simple-$name.log"
    t0=$(date +%s)
    rc=0
    # shellcheck disable=SC2086 # envs is a list of assignments
    env $envs "$ABLD/bin/llama-simple" -m "$model" -n "$NTOK" "$prompt" >"$log" 2>&1 || rc=$?
    setting=$(grep -o "CHESS method = .*" "$log" | head -1 || true)
    speed=$(grep -o "decoded [0-9]* tokens in .*" "$log" | head -1 || true)
    if [ $rc = 0 ] && ! san_report "$log" && [ -n "$setting" ] && [ -n "$speed" ]; then
        echo "llama-simple $name: $setting; $speed ($(( $(date +%s) - t0 )) s)"
    else
        echo "llama-simple $name: FAILED (exit $rc${setting:+, $setting}); log $log:"
        grep -E -A40 "Sanitizer|runtime error:" "$log" | head -80 || tail -30 "$log"
        fail=1
    fi
done

# --- 2. TSan: the kernel test with its real threads ---------------------------------------------
gi="$SRC/ggml/include"
if [ ! -f "$LBLD/bin/libggml-base.so" ] || [ ! -f "$LBLD/bin/libggml-cpu.so" ]; then
    echo "error: $LBLD/bin/libggml-{base,cpu}.so missing (run make first)" >&2
    exit 1
fi
mkdir -p "$TBLD"
t0=$(date +%s)
tflags=(-std=gnu11 -O1 -g -fno-omit-frame-pointer -march=native -fsanitize=thread -I native/src -I "$gi")
kobjs=()
for f in native/src/chess-kernels*.c; do
    o="$TBLD/$(basename "${f%.c}").o"
    "${cc_launch[@]}" gcc "${tflags[@]}" -c "$f" -o "$o"
    kobjs+=("$o")
done
"${cc_launch[@]}" gcc "${tflags[@]}" -c native/tests/test-chess-kernels.c -o "$TBLD/test-chess-kernels.o"
gcc -fsanitize=thread -o "$TBLD/test-chess-kernels" "$TBLD/test-chess-kernels.o" "${kobjs[@]}" \
    -L "$LBLD/bin" -Wl,-rpath,"$(realpath "$LBLD/bin")" -lggml-cpu -lggml-base -lm -pthread
echo "tsan build: $(( $(date +%s) - t0 )) s"
run_kernel_test "test-chess-kernels (tsan)" "$TBLD/test-chess-kernels" "$TBLD/test-chess-kernels.log"

echo "test-sanitize: $([ $fail = 0 ] && echo ok || echo FAILED) after $(( $(date +%s) - start )) s"
exit $fail
