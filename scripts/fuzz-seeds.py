#!/usr/bin/env python3
"""Seed corpus for the CHESS loader fuzz target (native/tests/fuzz-chess-check.cpp).

Tiny but complete CHESS GGUF files (a 2-layer "llama" header with only the CHESS tensors), small
enough for libFuzzer to mutate quickly: one with every part, one without attention, one with
f16 transposed copies and a single level. Plus regressions: inputs that once crashed the target,
rebuilt here byte for byte so every run replays them first. Usage: fuzz-seeds.py OUT_DIR
"""
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT, GGUFWriter
from gguf.quants import quantize

N_LAYER, N_EMBD, N_FF, N_HEAD = 2, 64, 96, 4


def seed(path: Path, levels, wt_type: QT, attention: bool) -> None:
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), arch="llama")
    w.add_block_count(N_LAYER)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_uint32("chess.version", 1)
    w.add_array("chess.levels", [float(x) for x in levels])
    w.add_float32("chess.default_level", float(levels[len(levels) // 2]))
    L = len(levels)

    def wt(name, rows, cols):  # ggml shape [cols, rows]: `rows` rows of `cols` elements
        data = rng.standard_normal((rows, cols)).astype(np.float32)
        if wt_type == QT.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, wt_type), raw_dtype=wt_type)

    for il in range(N_LAYER):
        tau = np.sort(np.abs(rng.standard_normal((L, N_FF))), axis=0).astype(np.float32)
        w.add_tensor(f"blk.{il}.chess_ffn_tau", tau)
        w.add_tensor(f"blk.{il}.chess_ffn_cats", np.linspace(0.1, 0.5, L, dtype=np.float32))
        wt(f"blk.{il}.chess_wt_down", N_FF, N_EMBD)
        if attention:
            w.add_tensor(f"blk.{il}.chess_thr_q", np.linspace(0.2, 0.6, L, dtype=np.float32))
            w.add_tensor(f"blk.{il}.chess_thr_o", np.linspace(0.3, 0.7, L, dtype=np.float32))
            wt(f"blk.{il}.chess_wt_q", N_EMBD, N_EMBD)
            wt(f"blk.{il}.chess_wt_o", N_EMBD, N_EMBD)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def regression_zero_dim_overflow(path: Path) -> None:
    """One f32 tensor of shape (0x2a<<48, 0, 0x32<<48, 0): stock gguf.cpp multiplied the zero into
    its element count and accepted the shape, ggml_new_tensor skips zeros and aborted (CI, #7)."""
    ne = (0x2A << 48, 0, 0x32 << 48, 0)
    info = struct.pack("<Q", 0) + struct.pack("<I", 4) + struct.pack("<4q", *ne) + struct.pack("<IQ", 0, 0)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + info + bytes(32))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    seed(out / "seed-full.gguf", [0.3, 0.5, 0.7], QT.Q8_0, True)
    seed(out / "seed-ffn-only.gguf", [0.5, 0.7], QT.Q4_0, False)
    seed(out / "seed-f16-one-level.gguf", [0.5], QT.F16, True)
    regression_zero_dim_overflow(out / "regression-zero-dim-overflow.gguf")


if __name__ == "__main__":
    main()
