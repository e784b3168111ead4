#!/usr/bin/env bash
# Developer helper: after editing build/llama.cpp by hand, write the edits back into the
# patch series. Each patch owns a fixed set of files (kept small and reviewable by area).
set -euo pipefail
tree=${1:-build/llama.cpp}
out=native/patches
save() { local name=$1; shift; git -C "$tree" diff pristine -- "$@" > "$out/$name"; echo "wrote $out/$name ($(wc -l < "$out/$name") lines)"; }
save 0001-build-hook.patch CMakeLists.txt src/CMakeLists.txt
save 0002-loader.patch src/llama-arch.h src/llama-arch.cpp src/llama-model.h src/llama-model.cpp src/llama-model-loader.h src/llama-model-loader.cpp
save 0003-graph.patch src/llama-cparams.h src/llama-graph.h src/llama-graph.cpp
save 0004-api.patch include/llama.h src/llama-context.h src/llama-context.cpp
save 0005-gguf-shape-check.patch ggml/src/gguf.cpp
# drop empty patches so the series only lists real changes
find "$out" -name '*.patch' -empty -delete
