"""Hostile CHESS files (issue #7): mutants of one converted file, and the runs that judge them.

A mutant is a small picklable recipe derived deterministically from the real file's layout:
- byte patches written over a working copy and restored from the pristine file after the runs
  (GGUF header fields are fixed-width, so dims/type/offset/values can be patched in place);
- a truncation (a new file holding the first N bytes);
- a header splice for metadata edits that change a record's size (the data section is copied as is,
  tensor offsets being relative to it);
- a gguf.GGUFWriter rewrite for the few that drop a tensor or change its byte size.
run_one() applies one mutant, runs `chess_gguf.inspect.inspect` in-process and the patched
llama-simple in a subprocess, undoes the mutant, and classifies both outcomes (ran/refused/crashed).
Only numpy and gguf are used to build the files; chess_gguf is imported only as the code under test.
"""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf.quants import dequantize, quantize

from chess_gguf import x4

REPO = Path(__file__).resolve().parent.parent
SIMPLE = REPO / "build" / "cmake" / "bin" / "llama-simple"
RUNTIME_TIMEOUT = 60  # s; a normal run takes ~0.4 s, so this only catches hangs on a busy machine
INSPECT_TIMEOUT = 60

REFUSE, RUN, ANY = "refuse", "run", "any"  # expectations
RAN, REFUSED, CRASHED = "ran", "refused", "crashed"  # outcomes
KINDS = ("chess_ffn_tau", "chess_ffn_cats", "chess_thr_q", "chess_thr_o", "chess_wt_down", "chess_wt_q", "chess_wt_o")
THRESHOLDS, SCALARS, WTS = KINDS[:4], KINDS[1:4], KINDS[4:]
PARTS = {"FFN": ("chess_ffn_tau", "chess_ffn_cats", "chess_wt_down"), "W_q": ("chess_thr_q", "chess_wt_q"),
         "W_o": ("chess_thr_o", "chess_wt_o")}
FAMILIES = ("control", "truncate", "chess-data-bytes", "chess-meta-bytes", "tensor-info-bytes", "wrong-shape",
            "bad-threshold", "missing", "wrong-type", "bad-levels")
# the runtime died rather than refused, whatever its exit code (ASan exits with 1)
CRASH_MARKERS = ("GGML_ASSERT", "AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer", "runtime error:",
                 "terminate called", "Segmentation fault", "Aborted", "core dumped", "stack smashing")


@dataclass(frozen=True)
class Mutant:
    family: str
    name: str
    patches: tuple = ()                    # ((offset, bytes), ...) over the working copy
    truncate: Optional[int] = None         # keep the first N bytes
    kv: tuple = ()                         # ((op, key, record), ...), op: set | drop | add
    tensors: tuple = ()                    # ((name, recipe or None), ...): GGUFWriter rewrite, None drops
    runtime: str = REFUSE
    inspect: str = REFUSE
    names: tuple = ()                      # a refusal must name one of these (empty: any message)
    inspect_names: Optional[tuple] = None  # for inspect, when different from names
    env: tuple = ()                        # extra environment for llama-simple

    @property
    def inspect_must_name(self) -> tuple:
        return self.names if self.inspect_names is None else self.inspect_names


# --- layout of the pristine file ------------------------------------------------------------------

def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class Layout:
    """Byte offsets of a GGUF file's key records, tensor-info records and tensor data (via GGUFReader,
    whose parts are views into the file)."""

    def __init__(self, reader: GGUFReader) -> None:
        base = _addr(reader.data)

        def at(part) -> int:
            return _addr(part) - base

        self.size = int(reader.data.shape[0])
        self.alignment = int(reader.alignment)
        self.data_start = int(reader.data_offset)
        self.kv: dict[str, dict] = {}
        for name, f in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            p = f.parts  # key length, key, value type, value parts...
            d = {"start": int(f.offset), "key_len": at(p[0]), "key": at(p[1]), "type": at(p[2]), "vtype": int(p[2][0]),
                 "end": at(p[-1]) + int(p[-1].nbytes)}
            if d["vtype"] == VT.ARRAY:
                d.update(itype=at(p[3]), count=at(p[4]), items=[at(p[i]) for i in f.data])
            elif d["vtype"] == VT.STRING:
                d.update(str_len=at(p[3]), chars=at(p[4]), n_chars=int(p[4].nbytes))
            else:
                d["value"] = at(p[3])
            self.kv[name] = d
        self.kv_end = max(d["end"] for d in self.kv.values())
        self.ti: dict[str, dict] = {}
        self.tensors: dict[str, object] = {}
        for t in reader.tensors:
            p = t.field.parts  # name length, name, n_dims, dims, type, offset
            self.ti[t.name] = {"start": int(t.field.offset), "name_len": at(p[0]), "name": at(p[1]), "n_dims": at(p[2]),
                               "dims": at(p[3]), "type": at(p[4]), "offset": at(p[5]), "end": at(p[5]) + 8}
            self.tensors[t.name] = t
        self.ti_end = max(d["end"] for d in self.ti.values())
        arch = reader.fields["general.architecture"].contents()
        hp = {k: int(reader.fields[f"{arch}.{k}"].contents()) for k in
              ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")}
        self.n_layer, self.n_embd, self.n_ff, self.n_head = hp.values()

        def head_dim(key: str) -> int:
            f = reader.fields.get(f"{arch}.attention.{key}")
            return int(f.contents()) if f is not None else self.n_embd // self.n_head
        self.n_q, self.n_o = self.n_head * head_dim("key_length"), self.n_head * head_dim("value_length")
        self.levels = np.asarray(reader.fields["chess.levels"].contents(), dtype=np.float32)
        self.default = np.float32(reader.fields["chess.default_level"].contents())

    def tname(self, il: int, kind: str) -> str:
        return f"blk.{il}.{kind}"

    def data_of(self, name: str) -> tuple[int, int]:
        t = self.tensors[name]
        return int(t.data_offset), int(t.n_bytes)


def nbytes(shape, qtype: int) -> int:
    block, size = GGML_QUANT_SIZES[QT(qtype)]
    return int(np.prod(shape)) // block * size


def padded(n: int, align: int) -> int:
    return -(-n // align) * align


# --- encoders -------------------------------------------------------------------------------------

def f32(*v) -> bytes:
    return np.array(v, dtype="<f4").tobytes()


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(*v) -> bytes:
    return struct.pack(f"<{len(v)}Q", *v)


_FMT = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i", VT.FLOAT32: "f",
        VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d", VT.BOOL: "?"}
_SIZE = {t: struct.calcsize("<" + f) for t, f in _FMT.items()}


def _value(vtype: int, v) -> bytes:
    if vtype == VT.STRING:
        b = v.encode()
        return struct.pack("<Q", len(b)) + b
    return struct.pack("<" + _FMT[VT(vtype)], v)


def kv_record(key: str, vtype: int, value, itype: Optional[int] = None) -> bytes:
    """One GGUF key/value record (any element count, including the empty arrays GGUFWriter refuses)."""
    k = key.encode()
    out = struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype)
    if vtype == VT.ARRAY:
        return out + struct.pack("<IQ", itype, len(value)) + b"".join(_value(itype, v) for v in value)
    return out + _value(vtype, value)


def threshold_rule(kind: str, vals: np.ndarray) -> str:
    """docs/format.md: thresholds are >= 0 and not NaN; +inf only in chess_ffn_tau (a channel with m_i = 0)."""
    v = np.asarray(vals, dtype=np.float32)
    bad = np.isnan(v) | (v < 0)
    if kind != "chess_ffn_tau":
        bad |= np.isinf(v)
    return REFUSE if bad.any() else RUN


def levels_rule(levels, default) -> tuple[str, tuple]:
    lv = np.asarray(levels, dtype=np.float32)
    if not (1 <= lv.size <= 64 and np.all((lv > 0) & (lv < 1)) and np.all(np.diff(lv) > 0)):
        return REFUSE, ("chess.levels",)
    if np.float32(default) not in lv:
        return REFUSE, ("chess.default_level",)
    return RUN, ()


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- the mutants ----------------------------------------------------------------------------------

def generate(reader: GGUFReader, seed: int = 7) -> list[Mutant]:
    lay = Layout(reader)
    rng = np.random.default_rng(seed)
    raw = bytes(reader.data[:lay.ti_end])  # header bytes, to derive flipped values
    out: list[Mutant] = []
    L, n_layer, n_ff, n_embd, n_q, n_o = lay.levels.size, lay.n_layer, lay.n_ff, lay.n_embd, lay.n_q, lay.n_o
    layers = [0, n_layer - 1] + sorted(int(x) for x in rng.choice(np.arange(1, n_layer - 1), 3, replace=False))

    def layer() -> int:
        return layers[int(rng.integers(len(layers)))]

    def cats_env(kind: str) -> tuple:  # the CATS thresholds are read only by the cats method
        return (("CHESS_METHOD", "cats"),) if kind == "chess_ffn_cats" else ()

    def add(**kw) -> None:
        out.append(Mutant(**kw))

    def flip(off: int) -> tuple[int, bytes]:  # a byte at off replaced by a different one
        return off, bytes([raw_byte(off) ^ int(rng.integers(1, 256))])

    def raw_byte(off: int) -> int:
        return raw[off] if off < len(raw) else int(reader.data[off])

    add(family="control", name="pristine copy", runtime=RUN, inspect=RUN)
    add(family="control", name="pristine copy, CHESS_METHOD=cats", runtime=RUN, inspect=RUN,
        env=(("CHESS_METHOD", "cats"),))

    # -- truncations: header, metadata, tensor infos, CHESS data, other data
    il = layer()
    tok = lay.kv["tokenizer.ggml.tokens"]["items"]
    wt_down, last = lay.data_of(lay.tname(il, "chess_wt_down")), reader.tensors[-1].name
    cuts = {
        "inside the magic": 3, "inside the version": 6, "inside the tensor count": 12, "inside the key count": 20,
        "inside the first key": lay.kv["general.architecture"]["key"] + 3,
        "inside general.name": lay.kv["general.name"]["chars"] + 2,
        "inside the token list (start)": tok[10] + 1, "inside the token list (middle)": tok[len(tok) // 2],
        "inside the merges": lay.kv["tokenizer.ggml.merges"]["items"][1000] + 2,
        "inside chess.levels": lay.kv["chess.levels"]["items"][1] + 2,
        "inside chess.default_level": lay.kv["chess.default_level"]["value"] + 1,
        "at the end of the metadata": lay.kv_end,
        "inside the first tensor info": lay.ti[reader.tensors[0].name]["name"] + 2,
        f"inside the dims of blk.{il}.chess_ffn_tau": lay.ti[lay.tname(il, "chess_ffn_tau")]["dims"] + 3,
        f"inside the type of blk.{il}.chess_wt_q": lay.ti[lay.tname(il, "chess_wt_q")]["type"] + 1,
        f"inside the offset of blk.{il}.chess_thr_o": lay.ti[lay.tname(il, "chess_thr_o")]["offset"] + 4,
        "at the last byte of the tensor infos": lay.ti_end - 1,
        "at the start of the data": lay.data_start,
        "inside token_embd.weight": lay.data_of("token_embd.weight")[0] + 1000,
        f"inside blk.{il}.ffn_up.weight": sum(lay.data_of(f"blk.{il}.ffn_up.weight")) - 7777,
        f"inside blk.{il}.chess_ffn_tau": lay.data_of(lay.tname(il, "chess_ffn_tau"))[0] + 4 * n_ff + 2,
        f"inside blk.{il}.chess_ffn_cats": lay.data_of(lay.tname(il, "chess_ffn_cats"))[0] + 5,
        f"inside blk.{il}.chess_wt_down": wt_down[0] + wt_down[1] // 2,
        f"inside {last} (the last tensor)": lay.data_of(last)[0] + 100,
        "one byte short": lay.size - 1,
    }
    for what, n in cuts.items():
        add(family="truncate", name=f"cut at byte {n} ({what})", truncate=int(n))

    # -- random bytes in CHESS tensor data: thresholds judged by the format's rule, weights must not crash
    for kind in THRESHOLDS:
        for _ in range(6):
            il = layer()
            name = lay.tname(il, kind)
            start, n = lay.data_of(name)
            i = int(rng.integers(n // 4))
            b = 3 if rng.random() < 0.5 else int(rng.integers(3))  # byte 3 holds the sign and exponent
            old = bytearray(reader.data[start + 4 * i:start + 4 * i + 4].tobytes())
            old[b] ^= int(rng.integers(1, 256))
            v = np.frombuffer(bytes(old), dtype="<f4")
            add(family="chess-data-bytes", name=f"{name}: byte {b} of element {i} -> value {float(v[0])!r}",
                patches=((start + 4 * i, bytes(old)),), runtime=threshold_rule(kind, v), inspect=threshold_rule(kind, v),
                names=(name,), env=cats_env(kind))
    for _ in range(2):
        il = layer()
        name = lay.tname(il, "chess_ffn_tau")
        start, n = lay.data_of(name)
        i = int(rng.integers(n // 4 - 4))
        junk = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        v = np.frombuffer(junk, dtype="<f4")
        add(family="chess-data-bytes", name=f"{name}: 16 random bytes at element {i} -> {v.tolist()}",
            patches=((start + 4 * i, junk),), runtime=threshold_rule("chess_ffn_tau", v),
            inspect=threshold_rule("chess_ffn_tau", v), names=(name,))
    for kind in WTS:
        for _ in range(3):
            il = layer()
            name = lay.tname(il, kind)
            start, n = lay.data_of(name)
            pos = int(rng.integers(n - 64))
            junk = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
            add(family="chess-data-bytes", name=f"{name}: 32 random bytes at byte {pos} of its data",
                patches=((start + pos, junk),), runtime=ANY, inspect=ANY)

    # -- random bytes in the chess.* records: key, value, type, lengths
    critical = ("chess.version", "chess.levels", "chess.default_level")
    for key, d in lay.kv.items():
        if not key.startswith("chess."):
            continue
        # a byte of the key: a critical key goes missing, any other one is ignored by the loader
        off, nb = flip(d["key"] + int(rng.integers(len(key))))
        new_key = bytearray(key.encode())
        new_key[off - d["key"]] = nb[0]
        ok = _utf8(bytes(new_key))
        if key in critical:
            add(family="chess-meta-bytes", name=f"{key}: key renamed to {bytes(new_key)!r}", patches=((off, nb),),
                names=() if key == "chess.version" else (key,), inspect_names=(key,) if ok else ())
        else:
            add(family="chess-meta-bytes", name=f"{key}: key renamed to {bytes(new_key)!r}", patches=((off, nb),),
                runtime=RUN, inspect=RUN if ok else REFUSE)
        # the value type: a critical key of another type is refused (named when the size is the same)
        vt = d["vtype"]
        nt = vt ^ int(rng.choice([1, 2, 3, 8, 16]))
        same = vt in _SIZE and VT._value2member_map_.get(nt) in _SIZE and _SIZE[VT(vt)] == _SIZE[VT(nt)]
        if key in critical:
            add(family="chess-meta-bytes", name=f"{key}: value type {vt} -> {nt}", patches=((d["type"], u32(nt)),),
                names=(key,) if same else ())
        else:
            add(family="chess-meta-bytes", name=f"{key}: value type {vt} -> {nt}", patches=((d["type"], u32(nt)),),
                runtime=ANY, inspect=ANY)
        # the value
        if key == "chess.version":
            for _ in range(2):
                off, nb = flip(d["value"] + int(rng.integers(4)))
                add(family="chess-meta-bytes", name=f"chess.version: value byte {off - d['value']} -> {nb[0]}",
                    patches=((off, nb),), names=(key,))
        elif key == "chess.levels":
            for _ in range(4):
                k = int(rng.integers(len(d["items"])))
                b = 3 if rng.random() < 0.5 else int(rng.integers(3))
                off, nb = flip(d["items"][k] + b)
                lv = bytearray(lay.levels.astype("<f4").tobytes())
                lv[4 * k + b] = nb[0]
                new = np.frombuffer(bytes(lv), dtype="<f4")
                exp, names = levels_rule(new, lay.default)
                add(family="chess-meta-bytes", name=f"chess.levels: byte {b} of level {k} -> {new.tolist()}",
                    patches=((off, nb),), runtime=exp, inspect=exp, names=names)
            off, nb = d["count"], u64(L ^ (1 << int(rng.integers(0, 40))))
            add(family="chess-meta-bytes", name=f"chess.levels: count {L} -> {struct.unpack('<Q', nb)[0]}",
                patches=((off, nb),))
        elif key == "chess.default_level":
            for _ in range(2):
                b = 3 if rng.random() < 0.5 else int(rng.integers(3))
                off, nb = flip(d["value"] + b)
                v = bytearray(np.float32(lay.default).astype("<f4").tobytes())
                v[b] = nb[0]
                new = np.frombuffer(bytes(v), dtype="<f4")[0]
                exp, names = levels_rule(lay.levels, new)
                add(family="chess-meta-bytes", name=f"chess.default_level: byte {b} -> {float(new)!r}",
                    patches=((off, nb),), runtime=exp, inspect=exp, names=names)
        elif vt == VT.STRING:  # informational strings are ignored; chess.layout must be dual or compact
            off, nb = flip(d["chars"] + int(rng.integers(d["n_chars"])))
            exp = REFUSE if key == "chess.layout" else RUN
            add(family="chess-meta-bytes", name=f"{key}: a character -> byte {nb[0]}", patches=((off, nb),),
                runtime=exp, inspect=exp, names=(key,) if exp == REFUSE else ())
            off, nb = d["str_len"], u64(d["n_chars"] ^ (1 << int(rng.integers(0, 40))))
            add(family="chess-meta-bytes", name=f"{key}: string length -> {struct.unpack('<Q', nb)[0]}",
                patches=((off, nb),))
        else:
            off, nb = flip(d["value"])
            add(family="chess-meta-bytes", name=f"{key}: value byte 0 -> {nb[0]}", patches=((off, nb),),
                runtime=RUN, inspect=RUN)
        if key in critical:  # the key length: the rest of the header no longer parses
            nl = len(key) ^ (1 << int(rng.integers(0, 12)))
            add(family="chess-meta-bytes", name=f"{key}: key length {len(key)} -> {nl}",
                patches=((d["key_len"], u64(nl)),))

    # -- random bytes in the tensor-info records of CHESS tensors: llama.cpp must refuse all of them;
    # inspect too, except for a renamed tensor that no longer looks like a CHESS one
    fields = ("name_len", "name", "n_dims", "dims", "type", "offset")
    for j, kind in enumerate(KINDS):
        for field in ("name", "dims", "type", "offset", fields[j % 3 * 2], fields[j % 3 * 2 + 1]):
            il = layer()
            name = lay.tname(il, kind)
            ti = lay.ti[name]
            span = {"name_len": 8, "name": len(name), "n_dims": 4, "dims": ti["type"] - ti["dims"], "type": 4,
                    "offset": 8}[field]
            off, nb = flip(ti[field] + int(rng.integers(span)))
            add(family="tensor-info-bytes", name=f"{name}: {field} byte {off - ti[field]} -> {nb[0]}",
                patches=((off, nb),), inspect=ANY if field == "name" else REFUSE)

    # -- wrong shapes: in place when the padded byte size is unchanged (else llama.cpp's offset check
    # would refuse before the shape check), by a GGUFWriter rewrite otherwise
    def shape_patch(name: str, shape: tuple, what: str) -> None:
        t = lay.tensors[name]
        assert len(shape) == len(t.shape)  # n_dims stays: only the fixed-width dims are patched
        if tuple(shape) == tuple(int(x) for x in t.shape):
            return  # e.g. a square W_q: its transpose has the same shape
        if shape[0] % GGML_QUANT_SIZES[t.tensor_type][0]:
            return
        if padded(nbytes(shape, t.tensor_type), lay.alignment) != padded(int(t.n_bytes), lay.alignment):
            return
        add(family="wrong-shape", name=f"{name}: shape {list(shape)} ({what})",
            patches=((lay.ti[name]["dims"], u64(*shape)),), names=(name,), env=cats_env(name.split(".")[-1]))

    shape_patch(lay.tname(layer(), "chess_ffn_tau"), (L, n_ff), "transposed")
    shape_patch(lay.tname(layer(), "chess_ffn_tau"), (n_ff * L, 1), "one row")
    shape_patch(lay.tname(layer(), "chess_ffn_tau"), (n_ff // 2, 2 * L), "half the channels, twice the levels")
    for kind in SCALARS:
        for n, what in ((L - 1, "a level short"), (L + 1, "a level too many"), (1, "one value")):
            shape_patch(lay.tname(layer(), kind), (n,), what)
    for kind, shape in (("chess_wt_down", (n_embd, n_ff)), ("chess_wt_q", (n_q, n_embd)), ("chess_wt_o", (n_embd, n_o))):
        a, b = shape
        shape_patch(lay.tname(layer(), kind), (b, a), "stored untransposed")
        shape_patch(lay.tname(layer(), kind), (a // 2, b * 2), "same elements, rows halved")
        shape_patch(lay.tname(layer(), kind), (a * 2, b // 2), "same elements, rows doubled")
    for kind, recipe, what in (("chess_ffn_tau", "levels[:-1]", "a level short"), ("chess_ffn_tau", "flat", "1-D"),
                               ("chess_ffn_cats", "column", "[1, n_levels]"), ("chess_wt_down", "rows[:half]", "half of n_ff")):
        name = lay.tname(layer(), kind)
        add(family="wrong-shape", name=f"{name}: {what} (rewritten)", tensors=((name, recipe),), names=(name,),
            env=cats_env(kind))
    # a square copy holding the untransposed matrix cannot be told apart: it must still run cleanly
    for kind, orig in (("chess_wt_q", "attn_q.weight"), ("chess_wt_o", "attn_output.weight")):
        il = layer()
        name, src = lay.tname(il, kind), f"blk.{il}.{orig}"
        t, s = lay.tensors[name], lay.tensors[src]
        if list(t.shape) == list(s.shape) and t.tensor_type == s.tensor_type:
            add(family="wrong-shape", name=f"{name}: holds {src} untransposed (same square shape and type)",
                patches=((lay.data_of(name)[0], s.data.tobytes()),), runtime=RUN, inspect=RUN)

    # -- NaN / inf / negative thresholds
    for il, vals in ((layers[2], (np.nan, -np.inf, -1.0, -1e-38, np.inf, 0.0)), (layers[3], (np.nan, -2.5))):
        name = lay.tname(il, "chess_ffn_tau")
        c, k = int(rng.integers(n_ff)), int(rng.integers(L))
        for v in vals:
            exp = threshold_rule("chess_ffn_tau", [v])
            add(family="bad-threshold", name=f"{name}: {v} at channel {c}, level {k}",
                patches=((lay.data_of(name)[0] + 4 * (k * n_ff + c), f32(v)),), runtime=exp, inspect=exp, names=(name,))
    for kind in SCALARS:
        for il, vals in ((layers[1], (np.nan, np.inf, -np.inf, -0.25, 0.0)), (layers[4], (np.nan, -1e-3))):
            name = lay.tname(il, kind)
            k = int(rng.integers(L))
            for v in vals:
                exp = threshold_rule(kind, [v])
                add(family="bad-threshold", name=f"{name}: {v} at level {k}",
                    patches=((lay.data_of(name)[0] + 4 * k, f32(v)),), runtime=exp, inspect=exp, names=(name,),
                    env=cats_env(kind))

    # -- missing pieces: each part of a layer (FFN, W_q, W_o) is complete or absent (absent: it runs
    # dense); a part with a tensor missing is refused, naming the layer or the missing tensor
    for kind in KINDS:
        il = layer()
        name = lay.tname(il, kind)
        add(family="missing", name=f"{name} dropped", tensors=((name, None),), names=(name, f"blk.{il}:"),
            env=cats_env(kind))
    every_layer = tuple(f"blk.{i}:" for i in range(n_layer))
    for kind in KINDS:
        add(family="missing", name=f"every {kind} dropped", tensors=tuple((lay.tname(i, kind), None) for i in range(n_layer)),
            names=every_layer + tuple(lay.tname(i, kind) for i in range(n_layer)), env=cats_env(kind))
    for part, kinds in PARTS.items():
        il = layer()
        add(family="missing", name=f"the {part} part of blk.{il} dropped (runs dense)", runtime=RUN, inspect=RUN,
            tensors=tuple((lay.tname(il, k), None) for k in kinds))
    add(family="missing", name="every attention tensor dropped (as convert --no-attention)", runtime=RUN, inspect=RUN,
        tensors=tuple((lay.tname(i, k), None) for i in range(n_layer) for k in PARTS["W_q"] + PARTS["W_o"]))
    add(family="missing", name="every CHESS tensor dropped (keys only)", runtime=RUN, inspect=RUN,
        tensors=tuple((n, None) for n in lay.tensors if ".chess_" in n))
    for key in ("chess.levels", "chess.default_level", "chess.version"):
        add(family="missing", name=f"{key} dropped", kv=(("drop", key, None),),
            names=() if key == "chess.version" else (key,), inspect_names=(key,))
    add(family="missing", name="chess.attention dropped (informational)", kv=(("drop", "chess.attention", None),),
        runtime=RUN, inspect=RUN)

    # -- wrong types
    for kind, ty in (("chess_ffn_tau", QT.I32), ("chess_ffn_cats", QT.F16), ("chess_thr_q", QT.F16),
                     ("chess_thr_o", QT.BF16), ("chess_ffn_cats", QT.I32), ("chess_thr_q", QT.I16), ("chess_thr_o", QT.F64)):
        name = lay.tname(layer(), kind)
        t = lay.tensors[name]
        assert padded(nbytes(t.shape, ty), lay.alignment) == padded(int(t.n_bytes), lay.alignment)
        add(family="wrong-type", name=f"{name}: type f32 -> {ty.name.lower()} (in place)",
            patches=((lay.ti[name]["type"], u32(ty)),), names=(name,), env=cats_env(kind))
    for kind, recipe in (("chess_ffn_tau", "f16"), ("chess_ffn_tau", "q8_0")):
        name = lay.tname(layer(), kind)
        add(family="wrong-type", name=f"{name}: stored as {recipe} (rewritten)", tensors=((name, recipe),), names=(name,))
    # another type for a transposed copy is legal (docs/format.md, convert --wt-type)
    for kind, recipe in (("chess_wt_q", "q8_0"), ("chess_wt_o", "f16"), ("chess_wt_down", "q4_0"), ("chess_wt_o", "bf16")):
        name = lay.tname(layer(), kind)
        add(family="wrong-type", name=f"{name}: requantized to {recipe} (rewritten)", tensors=((name, recipe),),
            runtime=RUN, inspect=RUN)
    # integer types have no dot product in ggml: the kernels cannot use such a copy
    for kind, recipe in (("chess_wt_q", "i8"), ("chess_wt_down", "i32")):
        name = lay.tname(layer(), kind)
        add(family="wrong-type", name=f"{name}: stored as {recipe} (rewritten)", tensors=((name, recipe),), names=(name,))
    for kind, ty in (("chess_wt_down", QT.Q4_0), ("chess_wt_q", QT.Q5_1), ("chess_wt_o", QT.Q8_0)):
        name = lay.tname(layer(), kind)
        was = lay.tensors[name].tensor_type.name.lower()
        add(family="wrong-type", name=f"{name}: type {was} -> {ty.name.lower()} without requantizing (size changes)",
            patches=((lay.ti[name]["type"], u32(ty)),))
    for kind, ty in zip(KINDS, (4, 5, 31, 43, 1000, 0xFFFFFFFF, 0x80000003)):
        name = lay.tname(layer(), kind)
        add(family="wrong-type", name=f"{name}: invalid type id {ty}", patches=((lay.ti[name]["type"], u32(ty)),),
            names=(name,))

    # -- levels, default level, version
    lv, dv = lay.kv["chess.levels"], lay.kv["chess.default_level"]
    a, b, c = (float(x) for x in lay.levels[:3])
    for new in ((b, a, c), (a, c, b), (a, b, b), (b, b, c), (0.0, b, c), (a, b, 1.0), (-a, b, c), (a, b, 1.5),
                (np.nan, b, c), (a, b, np.inf)):
        exp, names = levels_rule(new, lay.default)
        add(family="bad-levels", name=f"chess.levels = {list(new)}", patches=((lv["items"][0], f32(*new)),),
            runtime=exp, inspect=exp, names=names)
    for ty in (VT.UINT32, VT.INT32):
        add(family="bad-levels", name=f"chess.levels: elements typed {ty.name.lower()}", patches=((lv["itype"], u32(ty)),),
            names=("chess.levels",))
    for v in (0.4, float(np.nextafter(np.float32(lay.default), np.float32(1))), np.nan, 0.0, 1.0, -0.5):
        add(family="bad-levels", name=f"chess.default_level = {v!r}", patches=((dv["value"], f32(v)),),
            names=("chess.default_level",))
    for ty in (VT.UINT32, VT.INT32):
        add(family="bad-levels", name=f"chess.default_level typed {ty.name.lower()}", patches=((dv["type"], u32(ty)),),
            names=("chess.default_level",))
    vv = lay.kv["chess.version"]
    for v in (2, 0, 0xFFFFFFFF):
        add(family="bad-levels", name=f"chess.version = {v}", patches=((vv["value"], u32(v)),), names=("chess.version",))
    add(family="bad-levels", name="chess.version typed int32", patches=((vv["type"], u32(VT.INT32)),),
        names=("chess.version",))
    many = [k / 66 for k in range(1, 66)]
    thr_names = tuple(lay.tname(i, k) for i in range(n_layer) for k in THRESHOLDS)
    for what, rec, names in (
            ("no levels (empty array)", kv_record("chess.levels", VT.ARRAY, [], VT.FLOAT32), ("chess.levels",)),
            ("65 levels", kv_record("chess.levels", VT.ARRAY, many, VT.FLOAT32), ("chess.levels",)),
            ("levels as float64", kv_record("chess.levels", VT.ARRAY, [a, b, c], VT.FLOAT64), ("chess.levels",)),
            ("levels as strings", kv_record("chess.levels", VT.ARRAY, [str(a), str(b), str(c)], VT.STRING), ("chess.levels",)),
            ("levels as one float32", kv_record("chess.levels", VT.FLOAT32, b), ("chess.levels",)),
            ("a 4th level the tensors lack", kv_record("chess.levels", VT.ARRAY, [a, b, c, 0.9], VT.FLOAT32), thr_names),
            ("a level short of the tensors", kv_record("chess.levels", VT.ARRAY, [a, b], VT.FLOAT32), thr_names),
            ("default as float64", kv_record("chess.default_level", VT.FLOAT64, float(lay.default)), ("chess.default_level",)),
            ("default as an array", kv_record("chess.default_level", VT.ARRAY, [float(lay.default)], VT.FLOAT32),
             ("chess.default_level",)),
            ("version as uint64", kv_record("chess.version", VT.UINT64, 1), ("chess.version",)),
            ("version as a string", kv_record("chess.version", VT.STRING, "1"), ("chess.version",))):
        key = rec[8:8 + struct.unpack("<Q", rec[:8])[0]].decode()
        add(family="bad-levels", name=f"{key}: {what} (spliced)", kv=(("set", key, rec),), names=names)
    add(family="bad-levels", name="chess.levels twice (spliced)",
        kv=(("add", "chess.levels", kv_record("chess.levels", VT.ARRAY, [a, b, c], VT.FLOAT32)),), names=("chess.levels",))

    # -- chess.layout: "compact" stores W_down/W_q/W_o only transposed, under the originals' names
    layout = (("set", "chess.layout", kv_record("chess.layout", VT.STRING, "compact")),)
    originals = {"chess_wt_down": "ffn_down.weight", "chess_wt_q": "attn_q.weight", "chess_wt_o": "attn_output.weight"}

    def compact(keep_original: tuple = (), keep_copy: tuple = ()) -> tuple:
        out = []
        for i in range(n_layer):
            for kind, orig in originals.items():
                if (i, kind) in keep_original:
                    out.append((lay.tname(i, kind), None))
                elif (i, kind) not in keep_copy:
                    out += [(f"blk.{i}.{orig}", None), (lay.tname(i, kind), f"as blk.{i}.{orig}")]
                else:
                    out.append((f"blk.{i}.{orig}", None))
        return tuple(out)
    add(family="control", name="the same file in the compact layout (rewritten)", tensors=compact(), kv=layout,
        runtime=RUN, inspect=RUN)
    il = layer()
    add(family="wrong-shape", name=f"compact layout, blk.{il}.ffn_down.weight untransposed (rewritten)",
        tensors=compact(keep_original=((il, "chess_wt_down"),)), kv=layout, names=(f"blk.{il}.ffn_down.weight",))
    il = layer()
    add(family="missing", name=f"compact layout, blk.{il}.attn_q.weight missing, chess_wt_q left (rewritten)",
        tensors=compact(keep_copy=((il, "chess_wt_q"),)), kv=layout,
        names=(f"blk.{il}.attn_q.weight", f"blk.{il}.chess_wt_q"))
    add(family="bad-levels", name="chess.layout = compact on a dual file (spliced)", kv=layout)
    add(family="bad-levels", name="chess.layout = sparse (spliced)",
        kv=(("set", "chess.layout", kv_record("chess.layout", VT.STRING, "sparse")),), names=("chess.layout",))
    if "chess.layout" in lay.kv:
        add(family="missing", name="chess.layout dropped (dual by default)", kv=(("drop", "chess.layout", None),),
            runtime=RUN, inspect=RUN)

    names = [m.name for m in out]
    assert len(names) == len(set(names)), "mutant names must be unique"
    return out


# --- applying a mutant ----------------------------------------------------------------------------

def _copy_range(src, dst, offset: int, count: int) -> None:
    src.seek(offset)
    while count > 0:
        buf = src.read(min(count, 16 << 20))
        if not buf:
            raise EOFError("short read")
        dst.write(buf)
        count -= len(buf)


def _splice_kv(lay: Layout, edits: tuple, src: Path, out: Path) -> None:
    with open(src, "rb") as f:
        head = f.read(lay.ti_end)
        recs = [(k, head[d["start"]:d["end"]]) for k, d in lay.kv.items()]
        for op, key, rec in edits:
            keys = [k for k, _ in recs]
            i = keys.index(key) if op != "add" and key in keys else len(recs)
            if op == "set" and i < len(recs):
                recs[i] = (key, rec)
            elif op == "drop":
                del recs[i]
            else:
                recs.append((key, rec))
        body = head[:16] + struct.pack("<Q", len(recs)) + b"".join(r for _, r in recs) + head[lay.kv_end:lay.ti_end]
        body += bytes(-len(body) % lay.alignment)
        with open(out, "wb") as g:
            g.write(body)
            _copy_range(f, g, lay.data_start, lay.size - lay.data_start)


def _recipe(name: str, t) -> tuple[np.ndarray, QT]:
    """Replacement data for tensor t: (array in numpy order or bytes [rows, row bytes], ggml type)."""
    if name == "levels[:-1]":
        return np.array(t.data[:-1]), QT.F32
    if name == "flat":
        return np.array(t.data).reshape(-1), QT.F32
    if name == "column":
        return np.array(t.data).reshape(-1, 1), QT.F32
    if name == "rows[:half]":
        return np.array(t.data[: t.data.shape[0] // 2]), t.tensor_type
    if t.tensor_type == QT.I8:  # an x4 copy (chess_gguf/x4.py): the [n_in, n_out] weight it holds
        n_out, n_in = int(t.shape[0]) // x4.BYTES_PER_32, int(t.shape[1]) * 32
        x = np.ascontiguousarray(x4.to_float(t.data, n_out, n_in).T)
    else:
        x = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
    if name == "f16":
        return x.astype(np.float16), QT.F16
    if name in ("i8", "i32"):
        return np.round(x * 50).astype(np.int8 if name == "i8" else np.int32), QT.I8 if name == "i8" else QT.I32
    ty = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "bf16": QT.BF16}[name]
    return quantize(x, ty), ty


def _rewrite(reader: GGUFReader, edits: tuple, out: Path) -> None:
    ed = dict(edits)
    w = GGUFWriter(str(out), arch=reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == VT.ARRAY and len(f.types) > 1 else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
        if name == "general.alignment":
            w.data_alignment = int(f.contents())
    for t in reader.tensors:
        if t.name not in ed:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        elif ed[t.name] is not None and ed[t.name].startswith("as "):  # renamed, data unchanged
            w.add_tensor(ed[t.name][3:], t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        elif ed[t.name] is not None:
            data, ty = _recipe(ed[t.name], t)
            w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


_W: dict = {}  # per-worker state: paths, the pristine reader and layout (parsed on first need)


def init_worker(pristine: str, tmp: str) -> None:
    work = Path(tmp) / f"work-{os.getpid()}.gguf"
    shutil.copyfile(pristine, work)
    _W.update(pristine=Path(pristine), work=work, tmp=Path(tmp), tick=time.time_ns(), n=0)


def _source() -> tuple[GGUFReader, Layout]:
    if "reader" not in _W:
        _W["reader"] = GGUFReader(_W["pristine"])
        _W["layout"] = Layout(_W["reader"])
    return _W["reader"], _W["layout"]


def _bump(path: Path) -> None:
    # a unique mtime: chess_gguf caches parsed files by (path, mtime, size), and in-place patches keep
    # the size while the filesystem's clock may not tick between two mutants
    _W["tick"] += 1_000_000
    os.utime(path, ns=(_W["tick"], _W["tick"]))


def apply(m: Mutant):
    """Make the mutant; returns (path, undo)."""
    work = _W["work"]
    if m.truncate is None and not m.kv and not m.tensors:
        with open(work, "r+b") as f:
            for off, b in m.patches:
                f.seek(off)
                f.write(b)
        _bump(work)

        def undo() -> None:
            with open(_W["pristine"], "rb") as src, open(work, "r+b") as f:
                for off, b in m.patches:
                    src.seek(off)
                    f.seek(off)
                    f.write(src.read(len(b)))
            _bump(work)
        return work, undo
    _W["n"] += 1
    out = _W["tmp"] / f"mutant-{os.getpid()}-{_W['n']}.gguf"  # a new name each time: no stale cache entry
    if m.truncate is not None:
        with open(_W["pristine"], "rb") as f, open(out, "wb") as g:
            _copy_range(f, g, 0, m.truncate)
    elif not m.tensors:
        _splice_kv(_source()[1], m.kv, _W["pristine"], out)
    else:
        _rewrite(_source()[0], m.tensors, out)
        if m.kv:  # then the keys, spliced into the rewritten file
            mid = out.with_name(out.name + ".tmp")
            out.rename(mid)
            _splice_kv(Layout(GGUFReader(mid)), m.kv, mid, out)
            mid.unlink()
    if m.patches:
        with open(out, "r+b") as f:
            for off, b in m.patches:
                f.seek(off)
                f.write(b)
    return out, lambda: out.unlink()


# --- running ----------------------------------------------------------------------------------------

class _Timeout(BaseException):  # not an Exception: nothing in the code under test may swallow it
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_inspect(path: Path) -> tuple[str, str]:
    from chess_gguf.inspect import inspect
    from chess_gguf.runtime import RuntimeError_
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(INSPECT_TIMEOUT)
    try:
        inspect(str(path))
        return RAN, ""
    except _Timeout:
        return CRASHED, f"inspect did not finish in {INSPECT_TIMEOUT} s"
    except (FileNotFoundError, RuntimeError_, ValueError) as e:  # what the CLI turns into `error: ...`, exit 1
        return REFUSED, str(e)
    except Exception:
        return CRASHED, traceback.format_exc(limit=-4)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def diagnostics(stderr: str) -> list[str]:
    """llama.cpp's error lines: gguf's messages and the loader's `error loading model: ...` (the
    metadata dump and the create_tensor lines name every key and tensor, so they do not count)."""
    out = []
    for line in stderr.splitlines():
        if line.startswith(("llama_model_loader: - ", "create_tensor:")):
            continue
        low = line.lower()
        if line.startswith("gguf_") or "error" in low or "fail" in low:
            out.append(line)
    return out


def run_runtime(path: Path, env: tuple) -> tuple[str, str, int]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CHESS_")}
    e.update(GGML_NO_BACKTRACE="1", **dict(env))  # no gdb attach on abort: the assertion text is enough
    try:
        p = subprocess.run([str(SIMPLE), "-m", str(path), "-n", "4", "Hello"], capture_output=True,
                           timeout=RUNTIME_TIMEOUT, env=e)
    except subprocess.TimeoutExpired as t:
        err = (t.stderr or b"").decode("utf-8", "replace")
        return CRASHED, f"timeout after {RUNTIME_TIMEOUT} s\n" + "\n".join(err.splitlines()[-6:]), -1
    err = p.stderr.decode("utf-8", "replace")
    tail = "\n".join(err.splitlines()[-6:])
    if p.returncode < 0:
        return CRASHED, f"killed by {signal.Signals(-p.returncode).name}\n{tail}", p.returncode
    marks = [m for m in CRASH_MARKERS if m in err]
    if marks:
        lines = [ln for ln in err.splitlines() if any(m in ln for m in marks)]
        return CRASHED, "\n".join(lines[:4] + [tail]), p.returncode
    if p.returncode == 0:
        return RAN, "", 0
    diag = diagnostics(err)
    if not diag:
        return CRASHED, f"exit {p.returncode} without an error message\n{tail}", p.returncode
    return REFUSED, "\n".join(diag), p.returncode


def run_one(m: Mutant) -> dict:
    t0 = time.perf_counter()
    path, undo = apply(m)
    try:
        ins, ins_msg = run_inspect(path)
        rt, rt_msg, rc = run_runtime(path, m.env)
    finally:
        undo()
    return {"mutant": m, "path": str(path), "inspect": ins, "inspect_msg": ins_msg, "runtime": rt, "runtime_msg": rt_msg,
            "rc": rc, "seconds": time.perf_counter() - t0}
