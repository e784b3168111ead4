"""The exact transposed layout "x4" for 4-bit weights (docs/format.md).

A 4-bit ggml weight stores w[j, i] = a[j, g] * q[j, i] + b[j, g]: a code q in 0..15 per weight and
one affine pair (a, b) per block of 32 inputs, g = i // 32 (Q4_0: a = d, b = -8d; Q4_1: a = d,
b = m; Q4_K: a = d*sc, b = -dmin*m per 32-weight sub-block). The sparse kernels read W by input
channel; requantizing a transposed copy rounds every weight a second time, which cost as much
perplexity as the sparsification itself (docs/measurements.md). x4 keeps the codes and the pairs
and only reorders them: one I8 row per group of 32 input channels,

    a: n_out f16 | b: n_out f16 | codes of channel 32g + c for c = 0..31: n_out/2 bytes each,
                                  per 32 outputs 16 bytes, byte k = q[k] | q[k + 16] << 4

20 bytes per 32 weights, as Q4_1. The pairs are stored in f16: exact for Q4_0 and Q4_1, whose d
and m are f16; Q4_K's products d*sc are rounded (relative error <= 2^-11, against the 4-bit step
of ~1/15 of the block's range).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import Q4_K

TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K)
BYTES_PER_32 = 20


def fits(qt, n_out: int, n_in: int) -> bool:
    """Whether a weight [n_out rows of n_in] of type qt can be stored as x4."""
    return qt in TYPES and n_out % 32 == 0 and n_in % 32 == 0


def row_bytes(n_out: int) -> int:
    """Bytes of one x4 row (one group of 32 input channels)."""
    return BYTES_PER_32 * n_out


def stored_shape(n_out: int, n_in: int) -> tuple[int, int]:
    """The I8 tensor's GGUF shape (ne0, ne1) holding a weight of n_out outputs and n_in inputs."""
    return row_bytes(n_out), n_in // 32


def weight_shape(ne0: int, ne1: int) -> tuple[int, int]:
    """(n_out, n_in) of the weight an x4 tensor of GGUF shape (ne0, ne1) holds."""
    return ne0 // BYTES_PER_32, ne1 * 32


def pair_bytes(n_bytes: int) -> int:
    """Bytes of an x4 copy that every decoded token reads whatever the sparsity: the (a, b) pairs,
    4 of every 20 bytes."""
    return n_bytes * 4 // BYTES_PER_32


def codes_affine(raw: np.ndarray, qt, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes q [n_out, n_in] (uint8, 0..15) and pairs a, b [n_out, n_in // 32] (f32) of a 4-bit weight
    whose rows (raw: n_out rows of bytes, as stored in the GGUF) hold n_in weights each."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n_out, -1)
    f16 = lambda x: x.copy().view(np.float16).astype(np.float32)[..., 0]  # noqa: E731
    if qt in (QT.Q4_0, QT.Q4_1):
        blk = raw.reshape(n_out, n_in // 32, -1)
        d = f16(blk[..., 0:2])
        a, b = (d, -8 * d) if qt == QT.Q4_0 else (d, f16(blk[..., 2:4]))
        qs = blk[..., -16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1)                       # [n_out, nb, 32]
    elif qt == QT.Q4_K:
        blk = raw.reshape(n_out * (n_in // 256), 144)
        d, dmin = f16(blk[:, 0:2]), f16(blk[:, 2:4])
        sc, m = Q4_K.get_scale_min(blk[:, 4:16])                              # [nsb, 8] each
        a = (d[:, None] * sc.reshape(-1, 8).astype(np.float32)).reshape(n_out, -1)
        b = -(dmin[:, None] * m.reshape(-1, 8).astype(np.float32)).reshape(n_out, -1)
        qs = blk[:, 16:].reshape(-1, 4, 1, 32)                                # 4 chunks of 64 weights
        q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n_out, n_in // 32, 32)
    else:
        raise ValueError(f"x4 holds 4-bit types {[t.name for t in TYPES]}, not {QT(qt).name}")
    return q.reshape(n_out, n_in), a.astype(np.float32), b.astype(np.float32)


def pack(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The x4 rows [n_in // 32, 20 * n_out] (uint8) of codes q [n_out, n_in] and pairs a, b."""
    n_out, n_in = q.shape
    qt = q.T.reshape(n_in, n_out // 32, 2, 16)
    codes = (qt[:, :, 0, :] | (qt[:, :, 1, :] << 4)).astype(np.uint8).reshape(n_in // 32, 16 * n_out)
    pairs = [np.ascontiguousarray(p.T.astype(np.float16)).view(np.uint8) for p in (a, b)]
    return np.concatenate(pairs + [codes], axis=1)


def from_raw(raw: np.ndarray, qt, n_out: int, n_in: int) -> np.ndarray:
    """x4 rows of a 4-bit weight given as stored in the GGUF (n_out rows of n_in weights)."""
    return pack(*codes_affine(raw, qt, n_out, n_in))


def to_float(data: np.ndarray, n_out: int, n_in: int) -> np.ndarray:
    """The weight [n_out, n_in] held by x4 rows, in f32: a*q + b (as the scalar reference kernel)."""
    rows = np.ascontiguousarray(data, dtype=np.uint8).reshape(n_in // 32, row_bytes(n_out))
    a = rows[:, :2 * n_out].copy().view(np.float16).astype(np.float32).T      # [n_out, n_in/32]
    b = rows[:, 2 * n_out:4 * n_out].copy().view(np.float16).astype(np.float32).T
    c = rows[:, 4 * n_out:].reshape(n_in, n_out // 32, 16)
    q = np.stack([c & 15, c >> 4], axis=2).reshape(n_in, n_out).T.astype(np.float32)
    return q * np.repeat(a, 32, axis=1) + np.repeat(b, 32, axis=1)
