"""Calibration: run text through the real (quantized) model and gather CHESS statistics.

One pass through the patched runtime with an eval callback on four graph nodes per layer:
  ffn_gate-N (gate before activation), ffn_up-N, attn_norm-N (W_q input), kqv_out-N (W_o input).
Per layer we keep
  - running sums of |u_i| and u_i^2 over ALL calibration tokens (the per-channel statistic m_i);
  - an evenly strided subsample of token rows of |act(g)|, |W_q input| and |W_o input| (float16),
    on which thresholds.py takes exact quantiles. tests/test_convert.py shows the subsample lands
    within 0.5 percentage points of the exact full-data quantile's realised sparsity.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .runtime import Context, Model
from .thresholds import act

# llama.cpp architectures whose FFN is built with a parallel gate (build_ffn, LLM_FFN_PAR).
SUPPORTED_ARCHS = {
    "llama": "silu", "mistral3": "silu", "qwen2": "silu", "qwen3": "silu",
    "gemma": "gelu", "gemma2": "gelu", "gemma3": "gelu",
}

NODE_RE = re.compile(r"^(ffn_gate|ffn_up|attn_norm|kqv_out)-(\d+)$")


@dataclass
class LayerStats:
    sum_abs_u: np.ndarray
    sum_sq_u: np.ndarray
    a: np.ndarray          # |act(g)| samples [rows, n_ff] float16
    q: np.ndarray          # |W_q input| samples [rows, n_embd]
    o: np.ndarray          # |W_o input| samples [rows, n_q]


@dataclass
class CalibStats:
    arch: str
    act: str
    n_tokens: int = 0
    n_rows: int = 0
    layers: list[LayerStats] = field(default_factory=list)
    tokens_sha256: str = ""


def arch_of(model: Model) -> tuple[str, str]:
    arch = model.meta("general.architecture") or "?"
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{model.path}: architecture {arch!r} is not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
    return arch, SUPPORTED_ARCHS[arch]


def calibrate(model: Model, tokens: Sequence[int], *, ctx: int = 512, threads: Optional[int] = None,
              max_rows: int = 8192, progress: bool = True) -> CalibStats:
    """Gather statistics over `tokens`, split into windows of ctx-1 tokens each led by BOS.

    The BOS position (an attention sink with outlier activations) is excluded from statistics.
    """
    arch, kind = arch_of(model)
    n_layer = model.n_layer
    win = ctx - 1 if model.add_bos else ctx
    windows = [list(tokens[s:s + win]) for s in range(0, len(tokens), win)]
    windows = [w for w in windows if len(w) >= 8]
    n_total = sum(len(w) for w in windows)
    if n_total == 0:
        raise ValueError("calibration text is too short (no full window of tokens)")
    stride = max(1, -(-n_total // max_rows))  # keep every stride-th token row
    n_rows = -(-n_total // stride)

    st = CalibStats(arch=arch, act=kind, n_tokens=n_total, n_rows=n_rows,
                    tokens_sha256=hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest())
    cur = {"keep": None, "row0": 0, "skip": 0}

    def alloc(width: int) -> np.ndarray:
        return np.zeros((n_rows, width), dtype=np.float16)

    def on_node(name: str, x: np.ndarray) -> None:
        kind_, il = NODE_RE.match(name).groups()
        il = int(il)
        x = x[cur["skip"]:]  # drop the BOS row
        if not st.layers or len(st.layers) <= il:
            while len(st.layers) <= il:
                st.layers.append(None)  # type: ignore[arg-type]
        L = st.layers[il]
        if L is None:
            L = st.layers[il] = LayerStats(np.zeros(0), np.zeros(0), np.zeros((0, 0), np.float16),
                                           np.zeros((0, 0), np.float16), np.zeros((0, 0), np.float16))
        keep, r0 = cur["keep"], cur["row0"]
        rows = slice(r0, r0 + len(keep))
        if kind_ == "ffn_up":
            if L.sum_abs_u.size == 0:
                L.sum_abs_u = np.zeros(x.shape[1], np.float64)
                L.sum_sq_u = np.zeros(x.shape[1], np.float64)
            L.sum_abs_u += np.abs(x).sum(axis=0, dtype=np.float64)
            L.sum_sq_u += np.square(x, dtype=np.float64).sum(axis=0)
        elif kind_ == "ffn_gate":
            if L.a.size == 0:
                L.a = alloc(x.shape[1])
            L.a[rows] = np.abs(act(x[keep], kind))
        elif kind_ == "attn_norm":
            if L.q.size == 0:
                L.q = alloc(x.shape[1])
            L.q[rows] = np.abs(x[keep])
        else:  # kqv_out
            if L.o.size == 0:
                L.o = alloc(x.shape[1])
            L.o[rows] = np.abs(x[keep])

    def wants(name: str) -> bool:
        return NODE_RE.match(name) is not None

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_total, unit="tok", desc="calibrating", dynamic_ncols=True)
    bos = [] if not model.add_bos else model.tokenize("", add_special=True)[:1]
    with Context(model, n_ctx=ctx, n_batch=ctx, n_threads=threads, eval_callback=(wants, on_node)) as c:
        g0 = 0  # global index of the window's first token
        for w in windows:
            idx = np.arange(g0, g0 + len(w))
            keep = np.nonzero(idx % stride == 0)[0]
            cur.update(keep=keep, row0=(g0 + stride - 1) // stride, skip=len(bos))
            c.clear()
            c.decode(bos + w, logits="compute")  # outputs for all rows: the last layer's FFN sees every token
            g0 += len(w)
            if bar:
                bar.update(len(w))
    if bar:
        bar.close()
    missing = [i for i in range(n_layer) if i >= len(st.layers) or st.layers[i] is None
               or st.layers[i].sum_abs_u.size == 0 or st.layers[i].a.size == 0
               or st.layers[i].q.size == 0 or st.layers[i].o.size == 0]
    if missing:
        raise RuntimeError(f"{model.path}: calibration saw no ffn_gate/ffn_up/attn_norm/kqv_out nodes for layers "
                           f"{missing[:8]}{'...' if len(missing) > 8 else ''}: is this a gated-FFN model?")
    return st
