#!/usr/bin/env bash
# Cross-compile the CHESS kernel tests for aarch64 and run them under qemu-user (`make test-arm`).
#
# Builds ggml (ggml-base, ggml-cpu) and the kernel test from the patched tree in build/llama.cpp
# with Debian's aarch64 cross toolchain into build/arm-cmake (static, ccache when present), for
# GGML_CPU_ARM_ARCH (default armv8.2-a+dotprod: the SDOT up kernels), plus the same tests built
# for plain armv8-a (NEON without SDOT). Both run under qemu-aarch64 against the scalar references;
# each must end with "N passed, 0 failed".
# Installs gcc/g++-aarch64-linux-gnu and qemu-user with apt-get when they are missing (as root).
#
#   scripts/test-arm.sh [llama.cpp source dir]      env: JOBS (default 2), ARM_ARCH, ARM_BLD
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-build/llama.cpp}
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
cmake --build "$BLD" -j "$JOBS" --target test-chess-kernels test-chess-kernels-armv8

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
echo "test-arm: $([ $fail = 0 ] && echo ok || echo FAILED) after $(( $(date +%s) - start )) s"
exit $fail
