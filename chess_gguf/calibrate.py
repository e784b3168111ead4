"""Calibration: run text through the real (quantized) model and gather CHESS statistics.

One pass through the patched runtime with an eval callback on four graph nodes per layer:
  ffn_gate-N (gate before activation), ffn_up-N, attn_norm-N (W_q input), kqv_out-N (W_o input),
and on result_norm (the output head's input, once per model).
Per layer we keep, over ALL calibration tokens:
  - running sums of |u_i| and u_i^2 (the per-channel statistic m_i);
  - log-spaced histograms of |act(g_i)| per channel, of |W_q input| and |W_o input| per layer, and
    of the head's input |h| (CalibStats.hist_head),
    from which thresholds.py takes the quantiles (tests/test_convert.py checks them against exact
    quantiles on all rows: within 0.5 percentage points of realised sparsity).
Optionally (keep_rows > 0, for tests) an evenly strided subsample of the raw rows; with
keep_signed also signed act(g) and u rows (float16) and the residual stream's mean squared norm
at the FFN (node ffn_inp-N), from which convert's per-layer budget measures the FFN output error.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import RuntimeError_
from .runtime import Context, Model, NativeStats
from .thresholds import ACTS, FINE_BINS, HIST_BINS, LOG_LO, act, bin_width, hist_index
from .windows import bos_tokens, led_by_bos
from .writer import sigterm_as_interrupt

# llama.cpp architectures whose FFN is built with a parallel gate (build_ffn, LLM_FFN_PAR).
SUPPORTED_ARCHS = {
    "llama": "silu", "mistral3": "silu", "qwen2": "silu", "qwen3": "silu",
    "gemma": "gelu", "gemma2": "gelu", "gemma3": "gelu",
    "smollm3": "silu", "granite": "silu", "exaone": "silu", "olmo2": "silu", "phi3": "silu", "glm4": "silu",
}

# Architectures whose ffn_up holds gate and up (gate rows first, SwiGLU): the ffn_up node is both.
FUSED_UP = {"phi3", "glm4"}
# Architectures without attn_norm: W_q reads the residual stream itself, i.e. the previous layer's
# output (l_out-(il-1)) or, in layer 0, the embeddings (embd).
NO_ATTN_NORM = {"olmo2"}

NODE_RE = re.compile(r"^(ffn_gate|ffn_up|attn_norm|kqv_out|ffn_inp|l_out)-(\d+)$")


def node_of(name: str, arch: str) -> Optional[tuple[str, int]]:
    """(statistic, layer) a graph node feeds for `arch`, or None; the head's input is layer -1."""
    if arch in NO_ATTN_NORM and name == "embd":
        return "attn_norm", 0
    if name == "result_norm":
        return "result_norm", -1
    m = NODE_RE.match(name)
    if m is None:
        return None
    kind, il = m.group(1), int(m.group(2))
    if kind == "l_out":
        return ("attn_norm", il + 1) if arch in NO_ATTN_NORM else None
    return kind, il


@dataclass
class LayerStats:
    sum_abs_u: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sum_sq_u: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hist_a: np.ndarray = field(default_factory=lambda: np.zeros((0, HIST_BINS), np.int64))  # [n_ff, bins]; uint32 when native
    hist_cats: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))  # pooled |act(g)|
    hist_q: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))
    hist_o: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))
    a: Optional[np.ndarray] = None  # raw row samples (keep_rows > 0 only): |act(g)| [rows, n_ff] f32
    q: Optional[np.ndarray] = None  # |W_q input| [rows, n_embd]
    o: Optional[np.ndarray] = None  # |W_o input| [rows, n_q]
    ga: Optional[np.ndarray] = None  # keep_signed: act(g) [rows, n_ff] f16
    u: Optional[np.ndarray] = None   # keep_signed: u [rows, n_ff] f16
    sum_r2: float = 0.0              # sum over tokens of ||ffn_inp||^2 (residual stream at the FFN)


@dataclass
class CalibStats:
    n_tokens: int = 0
    n_rows: int = 0
    layers: list[LayerStats] = field(default_factory=list)
    hist_head: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))  # |h| at the head
    head_rows: Optional[np.ndarray] = None  # keep_rows > 0: |h| [rows, n_embd] f32


SUPPORTED = f"supported: dense gated-FFN architectures {', '.join(sorted(SUPPORTED_ARCHS))}"


def activation_of(arch: Optional[str], path) -> str:
    """The FFN activation of a supported architecture, else one error naming the file."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: architecture {arch!r} is not supported ({SUPPORTED})")
    return SUPPORTED_ARCHS[arch]


def arch_of(model: Model) -> tuple[str, str]:
    arch = model.meta("general.architecture") or "?"
    return arch, activation_of(arch, model.path)


# the native statistics (NativeStats.read/write) of each LayerStats field
_NATIVE = {"sum_abs_u": NativeStats.SUM_ABS_U, "sum_sq_u": NativeStats.SUM_SQ_U, "hist_a": NativeStats.HIST_A,
           "hist_cats": NativeStats.HIST_CATS, "hist_q": NativeStats.HIST_Q, "hist_o": NativeStats.HIST_O}


def _native_layer(ns: NativeStats, il: int) -> LayerStats:
    L = LayerStats()
    for f, what in _NATIVE.items():
        v = ns.read(il, what)
        if v is not None:
            setattr(L, f, v)
    if L.sum_abs_u.size:
        L.hist_a = L.hist_a.reshape(L.sum_abs_u.size, HIST_BINS)
    return L


# --- checkpoints: the statistics are sums, so a run can stop after any window and resume ----------
CKPT_FORMAT = "chess-calib-checkpoint-2"
_ARRAYS = ("sum_abs_u", "sum_sq_u", "hist_a", "hist_cats", "hist_q", "hist_o", "a", "q", "o", "ga", "u")


def checkpoint_key(model: Model, tokens: Sequence[int], **settings) -> str:
    """What the statistics depend on: the model file (path, size, mtime), the tokens, the settings."""
    st = os.stat(model.path)
    h = hashlib.sha256(f"{CKPT_FORMAT}|{os.path.realpath(model.path)}|{st.st_size}|{st.st_mtime_ns}|"
                       f"{HIST_BINS}|{FINE_BINS}|{sorted(settings.items())}|".encode())
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, key: str, windows_done: int, layers: Iterable[LayerStats],
                    hist_head: Optional[np.ndarray] = None) -> None:
    """Atomically (a hidden temporary file renamed over the old one). The file is what np.savez writes
    (np.load reads it), written one layer at a time: `layers` may be a generator reading them."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def put(z: zipfile.ZipFile, name: str, v: np.ndarray) -> None:
        with z.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)

    try:
        with sigterm_as_interrupt(), open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", allowZip64=True) as z:
            for name, v in (("format", CKPT_FORMAT), ("key", key), ("windows", windows_done)):
                put(z, name, np.array(v))
            for il, L in enumerate(layers):
                for f in _ARRAYS:
                    v = getattr(L, f)
                    if v is not None:
                        put(z, f"{il}.{f}", v)
                put(z, f"{il}.sum_r2", np.array(L.sum_r2))
            if hist_head is not None:
                put(z, "head.hist_head", hist_head)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, key: str, n_layer: int) -> Optional[tuple[int, list[LayerStats], np.ndarray]]:
    """(windows done, statistics, head histogram) of a checkpoint made with `key`; None if there is none
    or it was made from other inputs; RuntimeError_ if it is damaged."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != CKPT_FORMAT:
                raise ValueError(f"format {str(z['format'])!r}")
            if str(z["key"]) != key:
                return None
            layers = []
            for il in range(n_layer):
                L = LayerStats()
                for f in _ARRAYS:
                    if f"{il}.{f}" in z:
                        setattr(L, f, z[f"{il}.{f}"])
                L.sum_r2 = float(z[f"{il}.sum_r2"])
                layers.append(L)
            head = z["head.hist_head"] if "head.hist_head" in z else np.zeros(FINE_BINS, np.int64)
            return int(z["windows"]), layers, head
    except Exception as e:  # truncated, not a zip, missing arrays, bad values
        raise RuntimeError_(f"{path}: damaged calibration checkpoint ({type(e).__name__}: {e}); "
                            "delete it to start afresh") from None


def calibrate(model: Model, tokens: Sequence[int], *, ctx: int = 512, threads: Optional[int] = None,
              keep_rows: int = 0, keep_signed: bool = False, progress: bool = True,
              native: Optional[bool] = None, stats_threads: Optional[int] = None,
              checkpoint: Optional[Path] = None, checkpoint_every: float = 300.0,
              after_tokens: int = 0) -> CalibStats:
    """Gather statistics over `tokens`, split into windows of ctx-1 tokens each led by BOS.

    The BOS position (an attention sink with outlier activations) is excluded from statistics.
    native (default: when no rows are kept) gathers them in C inside the runtime's eval callback
    (native/src/chess-calib.c, on stats_threads threads, default `threads`) instead of numpy here;
    the sums are the same bits, the counts the same up to values on a bin edge (tests/test_calib.py).
    checkpoint: a file where the statistics are saved every checkpoint_every seconds and at the end;
    a run with the same model, tokens and settings resumes from it (and skips calibration if it is
    complete). The caller removes it when it is done with the statistics.
    after_tokens: tokens the caller decodes after calibration at about the same speed (convert's rule
    choice); the progress bar then also shows the time left for both ("all done in").
    """
    if native is None:
        native = keep_rows == 0 and not keep_signed
    if native and (keep_rows or keep_signed):
        raise ValueError("calibrate: the native statistics keep no rows (keep_rows/keep_signed need native=False)")
    arch, kind = arch_of(model)
    n_layer = model.n_layer
    bos = bos_tokens(model)
    windows = led_by_bos(tokens, ctx, bos)
    n_total = sum(len(w) for w in windows)
    if n_total == 0:
        raise ValueError("calibration text is too short (no full window of tokens)")
    stride = max(1, -(-n_total // max(keep_rows, 1)))  # keep every stride-th token row
    n_rows = -(-n_total // stride) if keep_rows > 0 else 0

    st = CalibStats(n_tokens=n_total, n_rows=n_rows)
    cur = {"keep": None, "row0": 0, "skip": 0}

    def on_node(name: str, x: np.ndarray) -> None:
        kind_, il = node_of(name, arch)
        if il >= n_layer:  # the last layer's output
            return
        x = x[cur["skip"]:]  # drop the BOS row
        if kind_ == "result_norm":
            ax = np.abs(x)
            st.hist_head += np.bincount(hist_index(ax, FINE_BINS).ravel(), minlength=FINE_BINS)
            if n_rows:
                if st.head_rows is None:
                    st.head_rows = np.zeros((n_rows, ax.shape[1]), np.float32)
                st.head_rows[cur["row0"]:cur["row0"] + len(cur["keep"])] = ax[cur["keep"]]
            return
        if kind_ == "ffn_up" and arch in FUSED_UP:
            n = x.shape[1] // 2
            take("ffn_gate", il, x[:, :n])
            take("ffn_up", il, x[:, n:])
        else:
            take(kind_, il, x)

    def take(kind_: str, il: int, x: np.ndarray) -> None:
        while len(st.layers) <= il:
            st.layers.append(LayerStats())
        L = st.layers[il]
        rows = slice(cur["row0"], cur["row0"] + len(cur["keep"]))
        if kind_ == "ffn_inp":
            L.sum_r2 += float(np.square(x, dtype=np.float64).sum())
            return
        if n_rows and keep_signed and kind_ in ("ffn_gate", "ffn_up"):
            attr = "ga" if kind_ == "ffn_gate" else "u"
            if getattr(L, attr) is None:
                setattr(L, attr, np.zeros((n_rows, x.shape[1]), np.float16))
            getattr(L, attr)[rows] = (act(x[cur["keep"]], kind) if kind_ == "ffn_gate" else x[cur["keep"]])
        if kind_ == "ffn_up":
            if L.sum_abs_u.size == 0:
                L.sum_abs_u = np.zeros(x.shape[1], np.float64)
                L.sum_sq_u = np.zeros(x.shape[1], np.float64)
            L.sum_abs_u += np.abs(x).sum(axis=0, dtype=np.float64)
            L.sum_sq_u += np.square(x, dtype=np.float64).sum(axis=0)
            return
        ax = np.abs(act(x, kind)) if kind_ == "ffn_gate" else np.abs(x)
        if kind_ == "ffn_gate":
            n_ff = ax.shape[1]
            if L.hist_a.shape[0] == 0:
                L.hist_a = np.zeros((n_ff, HIST_BINS), np.int64)
            flat = hist_index(ax) + (np.arange(n_ff, dtype=np.int64) * HIST_BINS)[None, :]
            L.hist_a += np.bincount(flat.ravel(), minlength=n_ff * HIST_BINS).reshape(n_ff, HIST_BINS)
        h = {"ffn_gate": L.hist_cats, "attn_norm": L.hist_q, "kqv_out": L.hist_o}[kind_]
        h += np.bincount(hist_index(ax, FINE_BINS).ravel(), minlength=FINE_BINS)
        if n_rows:
            attr = {"ffn_gate": "a", "attn_norm": "q", "kqv_out": "o"}[kind_]
            if getattr(L, attr) is None:
                setattr(L, attr, np.zeros((n_rows, ax.shape[1]), np.float32))
            getattr(L, attr)[rows] = ax[cur["keep"]]

    def wants(name: str) -> bool:
        k = node_of(name, arch)
        return k is not None and k[1] < n_layer and (k[0] != "ffn_inp" or keep_signed)

    bar = None
    key = checkpoint_key(model, tokens, ctx=ctx, keep_rows=keep_rows, keep_signed=keep_signed, native=native)
    done = 0  # windows already counted (a resumed checkpoint)
    if checkpoint is not None:
        got = load_checkpoint(checkpoint, key, n_layer)
        if got is not None:
            done, st.layers, st.hist_head = got
        elif checkpoint.exists():
            print(f"note: {checkpoint} was made from other inputs: starting afresh", file=sys.stderr)
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_total, initial=sum(len(w) for w in windows[:done]), unit="tok", desc="calibrating",
                   dynamic_ncols=True)
    ns = None
    if native:
        ns = NativeStats(model, act=ACTS.index(kind), fused_up=arch in FUSED_UP, no_attn_norm=arch in NO_ATTN_NORM,
                         hist_bins=HIST_BINS, fine_bins=FINE_BINS, log_lo=LOG_LO, width_hist=bin_width(HIST_BINS),
                         width_fine=bin_width(FINE_BINS), threads=stats_threads or threads or os.cpu_count() or 1)
        ns.set_skip(len(bos))
        for il, L in enumerate(st.layers):  # a resumed checkpoint's totals
            for f, what in _NATIVE.items():
                v = getattr(L, f)
                if v is not None and v.size and (f != "hist_a" or v.shape[0]):
                    ns.write(il, what, v)
        if st.hist_head.any():
            ns.write(-1, NativeStats.HIST_HEAD, st.hist_head)
        hooks = {"native_stats": ns}
    else:
        hooks = {"eval_callback": (wants, on_node)}
    def layers() -> Iterable[LayerStats]:  # native: read one layer at a time (a checkpoint streams them)
        return (_native_layer(ns, il) for il in range(n_layer)) if ns is not None else st.layers

    def final_layers() -> list[LayerStats]:  # native: each layer freed once read (one copy of the counts)
        if ns is None:
            return st.layers
        out = []
        for il in range(n_layer):
            out.append(_native_layer(ns, il))
            ns.release(il)
        return out

    def head() -> np.ndarray:
        if ns is None:
            return st.hist_head
        v = ns.read(-1, NativeStats.HIST_HEAD)
        return np.zeros(FINE_BINS, np.int64) if v is None else v

    def save(n: int, stats: Iterable[LayerStats]) -> None:
        nonlocal checkpoint
        try:
            save_checkpoint(checkpoint, key, n, stats, head())
        except OSError as e:  # a full disk: go on without (the statistics are still in memory)
            print(f"note: {checkpoint}: cannot save the calibration checkpoint ({e.strerror or e}): "
                  "going on without", file=sys.stderr)
            checkpoint = None

    if done < len(windows):
        with Context(model, n_ctx=ctx, n_batch=ctx, n_threads=threads, **hooks) as c:
            g0 = sum(len(w) for w in windows[:done])  # global index of the window's first token
            last = time.monotonic()
            for i in range(done, len(windows)):
                w = windows[i]
                idx = np.arange(g0, g0 + len(w))
                keep = np.nonzero(idx % stride == 0)[0]
                cur.update(keep=keep, row0=(g0 + stride - 1) // stride, skip=len(bos))
                c.clear()
                c.decode(bos + w, logits="compute")  # outputs for all rows: the last layer's FFN sees every token
                g0 += len(w)
                if bar:
                    bar.update(len(w))
                    rate = bar.format_dict["rate"]
                    if after_tokens and rate:
                        left = (n_total - bar.n + after_tokens) / rate
                        bar.set_postfix_str(f"all done in {bar.format_interval(left)}", refresh=False)
                if checkpoint is not None and i + 1 < len(windows) and time.monotonic() - last >= checkpoint_every:
                    save(i + 1, layers())
                    last = time.monotonic()
        st.hist_head = head()
        st.layers = final_layers()
        if checkpoint is not None:
            save(len(windows), st.layers)
    if bar:
        bar.close()
    if ns is not None:
        ns.close()
    missing = [i for i in range(n_layer) if i >= len(st.layers) or st.layers[i].sum_abs_u.size == 0
               or st.layers[i].hist_a.shape[0] == 0 or not st.layers[i].hist_q.any() or not st.layers[i].hist_o.any()]
    if missing:
        raise RuntimeError_(f"{model.path}: calibration saw no ffn_gate/ffn_up/attn_norm/kqv_out nodes for layers "
                           f"{missing[:8]}{'...' if len(missing) > 8 else ''}: is this a gated-FFN model?")
    return st
