#!/usr/bin/env bash
# Cross-compile the CHESS kernel tests for aarch64 and run them under qemu-user (`make test-arm`).
#
# Builds ggml (ggml-base, ggml-cpu) and the kernel test from the patched tree in build/llama.cpp
# with Debian's aarch64 cross toolchain into build/arm-cmake (static, ccache when present), for
# GGML_CPU_ARM_ARCH (default armv8.2-a+dotprod: the SDOT up kernels), plus the same tests built
# for plain armv8-a (NEON without SDOT). Both run under qemu-aarch64 against the scalar references;
# each must end with "N passed, 0 failed".
# With a CHESS model (second argument), also a short greedy generation, dense and at level 0.5, by
# the aarch64 build under qemu and the x86 one (build/cmake), compared up to near-ties (below).
# Installs gcc/g++-aarch64-linux-gnu and qemu-user with apt-get when they are missing (as root).
#
#   scripts/test-arm.sh [llama.cpp source dir] [CHESS model]   env: JOBS (default 2), ARM_ARCH, ARM_BLD
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-build/llama.cpp}
MODEL=${2:-}
X86_GREEDY=build/cmake/bin/chess-greedy
N_GEN=24
# Largest allowed gap (nats) per level. Measured on SmolLM2 (24 tokens each way): dense 0.08, level
# 0.5 0.43. Sparse logits differ more between the builds (top-1 margins of one context differ by
# up to 1.3 nats): an activation that rounds to the other side of its threshold drops or keeps a
# whole channel, and 30 layers compound it. The kernels themselves match the scalar reference on
# both ISAs (the kernel tests above); this checks that whole generations agree up to near-ties.
GAP_MAX_off=0.25
GAP_MAX_sparse=1.0
BLD=${ARM_BLD:-build/arm-cmake}
ARCH=${ARM_ARCH:-armv8.2-a+dotprod}
JOBS=${JOBS:-2}
SYSROOT=/usr/aarch64-linux-gnu
start=$(date +%s)

need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "error: missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
        exit 1
    fi
    echo "installing Debian packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -f "$SRC/CMakeLists.txt" ] || { echo "error: no llama.cpp tree in $SRC (run make first)" >&2; exit 1; }

launcher=()
if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
# reconfigure when the options change (the stamp holds them)
opts="$ARCH|$SRC|$(pwd)/native"
if [ ! -f "$BLD/build.ninja" ] || [ "$(cat "$BLD/.chess-opts" 2>/dev/null)" != "$opts" ]; then
    rm -rf "$BLD"
    cmake -S "$SRC" -B "$BLD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
        -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
        "-DCMAKE_CROSSCOMPILING_EMULATOR=qemu-aarch64;-L;$SYSROOT" \
        -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF "-DGGML_CPU_ARM_ARCH=$ARCH" -DGGML_OPENMP=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
        -DCHESS_NATIVE_DIR="$(pwd)/native" "${launcher[@]}" >/dev/null
    echo "$opts" > "$BLD/.chess-opts"
fi
targets=(test-chess-kernels test-chess-kernels-armv8)
[ -n "$MODEL" ] && targets+=(chess-greedy)
cmake --build "$BLD" -j "$JOBS" --target "${targets[@]}"

fail=0
for t in test-chess-kernels test-chess-kernels-armv8; do
    variant=$ARCH
    [ "$t" = test-chess-kernels-armv8 ] && variant=armv8-a
    echo "== $t (kernels built for $variant), under qemu-aarch64"
    out=$(qemu-aarch64 -L $SYSROOT "$BLD/bin/$t") || true
    # the routes of the types with a fast path, the failures, and the summary line
    grep -E "^(up|in) .* (neon|dotprod|sve)-|FAIL" <<<"$out" | grep -v "^skip" || true
    last=$(tail -1 <<<"$out")
    echo "$t ($variant): $last"
    case "$last" in *" 0 failed") ;; *) fail=1 ;; esac
done
if [ -n "$MODEL" ]; then
    # Greedy generation, compared up to near-ties: ggml's NEON and x86 (AVX2/AVX-512) dot
    # products round differently (activations quantized per ISA, other summation orders), and
    # sparse decoding compares activations with thresholds, so two builds may pick different
    # tokens where the top two logits are nearly equal. Each build generates N_GEN tokens and the other replays them
    # (chess-greedy --force): at every step the replayed token must be within GAP_MAX_* of the
    # replaying build's own best logit.
    prompt="The capital of France is a city that"
    ids() { awk '{printf "%s%s", (NR > 1 ? "," : ""), $4}'; }
    maxgap() { awk 'BEGIN {m = 0} {if ($8 > m) m = $8} END {printf "%.4f", m}'; }
    for level in off 0.5; do
        x86=$(CHESS_LEVEL=$level "$X86_GREEDY" "$MODEL" $N_GEN "$prompt") || { echo "x86 chess-greedy failed"; fail=1; continue; }
        arm=$(CHESS_LEVEL=$level qemu-aarch64 -L $SYSROOT "$BLD/bin/chess-greedy" "$MODEL" $N_GEN "$prompt") \
            || { echo "aarch64 chess-greedy failed under qemu"; fail=1; continue; }
        arm_on_x86=$(CHESS_LEVEL=$level "$X86_GREEDY" "$MODEL" $N_GEN "$prompt" --force "$(ids <<<"$arm")") || fail=1
        x86_on_arm=$(CHESS_LEVEL=$level qemu-aarch64 -L $SYSROOT "$BLD/bin/chess-greedy" "$MODEL" $N_GEN "$prompt" \
                     --force "$(ids <<<"$x86")") || fail=1
        same=$(paste -d' ' <(ids <<<"$x86" | tr , '\n') <(ids <<<"$arm" | tr , '\n') | awk '$1 == $2 {n++} END {print n + 0}')
        g1=$(maxgap <<<"$arm_on_x86"); g2=$(maxgap <<<"$x86_on_arm")
        verdict=ok
        gmax=$GAP_MAX_sparse; [ $level = off ] && gmax=$GAP_MAX_off
        awk -v a="$g1" -v b="$g2" -v m="$gmax" 'BEGIN {exit !(a <= m && b <= m)}' || { verdict=FAILED; fail=1; }
        echo "generation at CHESS_LEVEL=$level, $N_GEN tokens: $same equal to x86 in place; largest logit gap of" \
             "the aarch64 tokens on x86 $g1, of the x86 tokens on aarch64 $g2 (max $gmax): $verdict"
    done
fi
echo "test-arm: $([ $fail = 0 ] && echo ok || echo FAILED) after $(( $(date +%s) - start )) s"
exit $fail
