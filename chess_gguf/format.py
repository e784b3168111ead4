"""The CHESS file format (docs/format.md): names and kinds of the CHESS tensors, the parts of a
layer, the layouts, and the validation and reading of a converted file, as the patched loader
sees it. Every command and test takes these facts from here.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGMLQuantizationType
from gguf.quants import dequantize

from . import gguf_io, x4
from .options import LAYOUTS

FORMAT_VERSION = 1  # chess.version
CHESS_PREFIX = "chess."  # every CHESS key
CHESS_TENSOR_MARK = ".chess_"
CHESS_TENSOR_RE = re.compile(r"^blk\.(\d+)\.(chess_\w+)$")
THRESHOLD_KINDS = ("chess_ffn_tau", "chess_ffn_cats", "chess_thr_q", "chess_thr_o")
WT_KINDS = ("chess_wt_down", "chess_wt_q", "chess_wt_o")
MAX_LEVELS = 64  # the loader's limit
# each part of a layer is complete or absent (absent: that part runs dense)
CHESS_PARTS = {"FFN": ("chess_ffn_tau", "chess_ffn_cats", "chess_wt_down"), "W_q": ("chess_thr_q", "chess_wt_q"),
               "W_o": ("chess_thr_o", "chess_wt_o")}
# The weights a decoded token reads sparsely, per layer: original name -> (realised-sparsity part,
# the threshold tensor whose presence makes the layer run that part sparsely, the transposed copy
# read instead in the dual layout; None = the tensor itself, row by row). In the compact layout
# the originals themselves are stored transposed and no chess_wt_* exists.
SPARSE_READS = {
    "ffn_up.weight": ("ffn", "chess_ffn_tau", None),
    "ffn_down.weight": ("ffn", "chess_ffn_tau", "chess_wt_down"),
    "attn_q.weight": ("q", "chess_thr_q", "chess_wt_q"),
    "attn_output.weight": ("o", "chess_thr_o", "chess_wt_o"),
}
# transposed copy -> the original it stands for ("ffn_down.weight", ...)
TRANSPOSED_OF = {copy: orig for orig, (_, _, copy) in SPARSE_READS.items() if copy}
# The output head's CHESS part (one per model): thresholds on |h| f32 [n_levels] (0 at a level = the
# head runs dense there) and the transposed copy [n_vocab, n_embd] of the head it reads instead.
HEAD_THR, HEAD_WT = "output.chess_thr", "output.chess_wt"
HEAD_TENSORS = (HEAD_THR, HEAD_WT)


def head_weight(names) -> str:
    """The tensor the output head multiplies by: output.weight, else the tied token embedding
    (llama.cpp's rule; a decoded token then reads all of it, where the embedding lookup reads a row)."""
    return "output.weight" if "output.weight" in names else "token_embd.weight"
# types without a dot product in ggml's CPU backend: the sparse kernels cannot read such a copy
WT_UNSUPPORTED = {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                  GGMLQuantizationType.I64, GGMLQuantizationType.F64}
_INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
              GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}


def is_chess_tensor(name: str) -> bool:
    return CHESS_TENSOR_MARK in name


def is_transposed_weight(name: str) -> bool:
    """A transposed copy, or an original that the compact layout stores transposed."""
    return CHESS_TENSOR_MARK + "wt_" in name or name == HEAD_WT or name.endswith(tuple(TRANSPOSED_OF.values()))


def tensor_f32(reader: GGUFReader, name: str) -> np.ndarray:
    """A tensor dequantized to float32, in numpy (row-major) shape (ne1, ne0); a transposed copy in the
    x4 layout as the copy it stands for, [n_in, n_out]."""
    for t in reader.tensors:
        if t.name == name and t.tensor_type == GGMLQuantizationType.I8 and is_transposed_weight(name):
            n_out, n_in = x4.weight_shape(int(t.shape[0]), int(t.shape[1]))
            return np.ascontiguousarray(x4.to_float(t.data, n_out, n_in).T)
        if t.name == name:
            data = dequantize(t.data, t.tensor_type)
            return np.asarray(data, dtype=np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
    raise KeyError(f"{name}: no such tensor")



# --- validation of a CHESS file, as the patched loader does it ----------------------------------

def _string(reader: GGUFReader, key: str, path) -> Optional[str]:
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types != [GGUFValueType.STRING]:
        raise ValueError(f"{path}: {key}: not a string")
    try:
        return bytes(f.parts[-1]).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: {key}: not valid UTF-8") from None


def _int_or_list(reader: GGUFReader, key: str, path) -> Any:
    """An integer key, or a per-layer integer array (llama.cpp accepts both for some hparams)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types and f.types[0] in _INT_TYPES and len(f.types) == 1:
        return int(f.contents())
    if f.types[:1] == [GGUFValueType.ARRAY] and len(f.types) == 2 and f.types[1] in _INT_TYPES:
        return [int(x) for x in f.contents()]
    raise ValueError(f"{path}: {key}: not an integer or an array of integers")


def check_chess(reader: GGUFReader, path: str | os.PathLike) -> dict:
    """Validate a CHESS file the way the patched loader does, and more: raises ValueError naming the
    file and the offending key or tensor, else returns {"levels", "default_level", "n_layer", "layout",
    "tensors": {(layer, kind): ReaderTensor}, "head": {HEAD_THR/HEAD_WT: ReaderTensor} or {}}.

    Checked: chess.version (uint32 1), chess.levels (1..64 float32, strictly increasing, inside (0, 1)),
    chess.default_level (a float32 among the levels), chess.layout (absent, "dual" or "compact": then
    blk.N.ffn_down/attn_q/attn_output.weight are the transposed copies and no chess_wt_* may exist);
    every CHESS tensor's name, layer, shape (against
    the model's hyperparameters and the number of levels), type (f32 thresholds; transposed copies of
    a type the kernels support, whose block size divides their rows) and threshold values (not NaN,
    >= 0; +inf only in chess_ffn_tau, where it marks a channel that is never kept); each part of a
    layer (CHESS_PARTS) complete or absent (absent: it runs dense); the head's part (HEAD_TENSORS:
    f32 thresholds finite and >= 0, a non-x4 copy of the head's transposed shape) complete or absent;
    and that tensor data is packed in
    order at aligned offsets, as llama.cpp's gguf loader requires.
    """
    chess_names = [t.name for t in reader.tensors if is_chess_tensor(t.name)]
    fv = reader.fields.get("chess.version")
    if fv is None:
        if chess_names:
            raise ValueError(f"{path}: chess.version: missing, but the file has CHESS tensors ({chess_names[0]}, ...)")
        raise ValueError(f"{path}: not a CHESS file (no chess.version key): run `python -m chess_gguf convert` first")
    if fv.types != [GGUFValueType.UINT32] or int(fv.contents()) != FORMAT_VERSION:
        raise ValueError(f"{path}: chess.version: unsupported CHESS format version (expected uint32 {FORMAT_VERSION})")

    fl = reader.fields.get("chess.levels")
    if fl is None or fl.types != [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]:
        if fl is not None and fl.types == [GGUFValueType.ARRAY] and not fl.contents():
            raise ValueError(f"{path}: chess.levels: 0 levels (expected 1..{MAX_LEVELS})")
        raise ValueError(f"{path}: chess.levels: missing or not an array of float32")
    levels = np.asarray(fl.contents(), dtype=np.float32)
    if not 1 <= levels.size <= MAX_LEVELS:
        raise ValueError(f"{path}: chess.levels: {levels.size} levels (expected 1..{MAX_LEVELS})")
    if not (np.all((levels > 0) & (levels < 1)) and np.all(np.diff(levels) > 0)):
        raise ValueError(f"{path}: chess.levels: levels must be strictly increasing and inside (0, 1), "
                         f"got {levels.tolist()}")
    fd = reader.fields.get("chess.default_level")
    if fd is None or fd.types != [GGUFValueType.FLOAT32]:
        raise ValueError(f"{path}: chess.default_level: missing or not float32")
    default = np.float32(fd.contents())
    if default not in levels:
        raise ValueError(f"{path}: chess.default_level: {float(default):g} is not one of chess.levels {levels.tolist()}")

    layout = _string(reader, "chess.layout", path) or "dual"
    if layout not in LAYOUTS:
        raise ValueError(f"{path}: chess.layout: expected the string dual or compact, got {layout!r}")

    arch = _string(reader, "general.architecture", path)
    if not arch:
        raise ValueError(f"{path}: general.architecture: missing")

    def hparam(key: str, required: bool = True) -> Any:
        v = _int_or_list(reader, f"{arch}.{key}", path)
        if v is None and required:
            raise ValueError(f"{path}: {arch}.{key}: missing (needed to check the CHESS tensor shapes)")
        return v

    n_layer, n_embd, n_ff, n_head = (hparam(k) for k in ("block_count", "embedding_length", "feed_forward_length",
                                                           "attention.head_count"))
    head_k, head_v = hparam("attention.key_length", False), hparam("attention.value_length", False)
    if isinstance(n_layer, list) or isinstance(n_embd, list):
        raise ValueError(f"{path}: {arch}.block_count/embedding_length: not a single integer")

    def at(v: Any, il: int) -> int:
        if isinstance(v, list):
            if len(v) != n_layer:
                raise ValueError(f"{path}: per-layer hyperparameter with {len(v)} entries for {n_layer} layers")
            return v[il]
        return v

    def expected(kind: str, il: int) -> tuple[int, ...]:
        nl, ff, nh = levels.size, at(n_ff, il), at(n_head, il)
        hk = head_k if head_k is not None else (n_embd // nh if nh else 0)
        hv = head_v if head_v is not None else (n_embd // nh if nh else 0)
        return {"chess_ffn_tau": (ff, nl), "chess_ffn_cats": (nl,), "chess_thr_q": (nl,), "chess_thr_o": (nl,),
                "chess_wt_down": (n_embd, ff), "chess_wt_q": (at(hk, il) * nh, n_embd),
                "chess_wt_o": (n_embd, at(hv, il) * nh)}[kind]

    def pad4(shape) -> tuple[int, ...]:  # ggml pads shapes with 1s to 4 dims
        return tuple(shape) + (1,) * (4 - len(shape))

    tensors: dict[tuple[int, str], Any] = {}

    def check(t: Any, il: int, kind: str) -> None:
        shape, want = [int(x) for x in t.shape], expected(kind, il)
        if kind in WT_KINDS and t.tensor_type == GGMLQuantizationType.I8:  # the exact x4 layout
            if want[0] % 32 or want[1] % 32:
                raise ValueError(f"{path}: {t.name}: the x4 layout needs dimensions that are multiples of 32, "
                                 f"not {list(want)}")
            want = x4.stored_shape(*want)
        if len(shape) > 4 or pad4(shape) != pad4(want):
            hint = " (a transposed copy: row i holds input channel i)" if kind in WT_KINDS else ""
            raise ValueError(f"{path}: {t.name}: shape {shape}, expected {list(want)}{hint}")
        if kind in THRESHOLD_KINDS:
            if t.tensor_type != GGMLQuantizationType.F32:
                raise ValueError(f"{path}: {t.name}: CHESS thresholds must be f32, not {t.tensor_type.name.lower()}")
            v = np.asarray(t.data, dtype=np.float32).reshape(levels.size, -1)  # [level, channel]
            bad = np.isnan(v) | (v < 0)
            if kind != "chess_ffn_tau":
                bad |= np.isinf(v)
            if bad.any():
                k, c = (int(x) for x in np.argwhere(bad)[0])
                where = f"channel {c}, level {float(levels[k]):g}" if kind == "chess_ffn_tau" else f"level {float(levels[k]):g}"
                rule = "not NaN and >= 0" if kind == "chess_ffn_tau" else "finite and >= 0"
                raise ValueError(f"{path}: {t.name}: invalid threshold {float(v[k, c])} at {where} (must be {rule})")
        elif t.tensor_type != GGMLQuantizationType.I8:
            _check_copy_type(t, shape[0], path)
        if (il, kind) in tensors:
            raise ValueError(f"{path}: {t.name}: duplicated")
        tensors[(il, kind)] = t

    head: dict[str, Any] = {}
    for t in reader.tensors:
        if not is_chess_tensor(t.name):
            continue
        if t.name in HEAD_TENSORS:
            if t.name in head:
                raise ValueError(f"{path}: {t.name}: duplicated")
            head[t.name] = t
            continue
        m = CHESS_TENSOR_RE.match(t.name)
        if not m or m.group(2) not in THRESHOLD_KINDS + WT_KINDS:
            raise ValueError(f"{path}: {t.name}: unknown CHESS tensor (expected blk.N.<one of "
                             f"{', '.join(THRESHOLD_KINDS + WT_KINDS)}> or {' or '.join(HEAD_TENSORS)})")
        il, kind = int(m.group(1)), m.group(2)
        if il >= n_layer:
            raise ValueError(f"{path}: {t.name}: layer {il} out of range (the model has {n_layer})")
        if layout == "compact" and kind in WT_KINDS:
            raise ValueError(f"{path}: {t.name}: not expected in the compact layout (the original "
                             f"{TRANSPOSED_OF[kind]} is the transposed copy)")
        check(t, il, kind)
    if layout == "compact":
        by_name = {t.name: t for t in reader.tensors}
        for il in range(n_layer):
            for kind, orig in TRANSPOSED_OF.items():
                if f"blk.{il}.{orig}" in by_name:
                    check(by_name[f"blk.{il}.{orig}"], il, kind)
    for il in sorted({il for il, _ in tensors}):
        for part, kinds in CHESS_PARTS.items():
            missing = [f"blk.{il}.{k}" for k in kinds if (il, k) not in tensors]
            if 0 < len(missing) < len(kinds):
                raise ValueError(f"{path}: blk.{il}: incomplete CHESS {part} tensors: {', '.join(missing)} missing "
                                 f"(a part is all or nothing)")

    if head:
        _check_head(reader, head, levels.size, path)

    # llama.cpp's gguf loader wants every tensor's data exactly where the previous one ends (padded)
    align, pos = int(reader.alignment), 0
    for t in reader.tensors:
        rel = int(t.data_offset) - int(reader.data_offset)
        if rel != pos:
            raise ValueError(f"{path}: {t.name}: data at offset {rel}, expected {pos} (tensors must be packed in order)")
        pos += -(-int(t.n_bytes) // align) * align
    return {"levels": levels, "default_level": default, "n_layer": n_layer, "layout": layout, "tensors": tensors,
            "head": head}


def _check_head(reader: GGUFReader, head: dict, n_levels: int, path) -> None:
    missing = [n for n in HEAD_TENSORS if n not in head]
    if missing:
        raise ValueError(f"{path}: incomplete CHESS head tensors: {', '.join(missing)} missing (a part is all or nothing)")
    by_name = {t.name: t for t in reader.tensors}
    w = by_name.get(head_weight(by_name))
    if w is None:
        raise ValueError(f"{path}: {HEAD_WT}: the file has no output.weight or token_embd.weight to stand for")
    thr, wt = head[HEAD_THR], head[HEAD_WT]
    if thr.tensor_type != GGMLQuantizationType.F32:
        raise ValueError(f"{path}: {HEAD_THR}: CHESS thresholds must be f32, not {thr.tensor_type.name.lower()}")
    if [int(x) for x in thr.shape] != [n_levels]:
        raise ValueError(f"{path}: {HEAD_THR}: shape {[int(x) for x in thr.shape]}, expected [{n_levels}]")
    v = np.asarray(thr.data, dtype=np.float32)
    if not np.all(np.isfinite(v) & (v >= 0)):
        k = int(np.argwhere(~(np.isfinite(v) & (v >= 0)))[0][0])
        raise ValueError(f"{path}: {HEAD_THR}: invalid threshold {float(v[k])} at level {k} (must be finite and >= 0)")
    want = [int(w.shape[1]), int(w.shape[0])]  # [n_vocab, n_embd]: row i holds input channel i
    if [int(x) for x in wt.shape] != want:
        raise ValueError(f"{path}: {HEAD_WT}: shape {[int(x) for x in wt.shape]}, expected {want} "
                         f"(the transposed {w.name})")
    _check_copy_type(wt, want[0], path)


def _check_copy_type(t: Any, row_len: int, path) -> None:
    """A transposed copy the kernels can read: a supported type whose block size divides its rows."""
    if t.tensor_type in WT_UNSUPPORTED:
        raise ValueError(f"{path}: {t.name}: type {t.tensor_type.name.lower()} is not supported by the CHESS kernels")
    block = GGML_QUANT_SIZES[t.tensor_type][0]
    if row_len % block:
        raise ValueError(f"{path}: {t.name}: rows of {row_len} are not a multiple of the "
                         f"{t.tensor_type.name} block size {block}")


def read_chess(path: str | os.PathLike) -> dict:
    """A converted file, read and validated (check_chess): its dict plus "reader" (the checked,
    cached gguf_io reader) and "meta" (every chess.* key; strings decoded leniently, since
    informational keys may hold any bytes). Raises ValueError naming the file and the problem."""
    r = gguf_io.read(path)
    info = check_chess(r, path)
    info["reader"] = r
    info["meta"] = {k: bytes(f.parts[-1]).decode("utf-8", "replace") if f.types == [GGUFValueType.STRING]
                    else f.contents() for k, f in r.fields.items() if k.startswith(CHESS_PREFIX)}
    return info
