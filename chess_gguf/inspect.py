"""`inspect`: CHESS metadata, per-layer threshold statistics, and realised sparsity on a text.

Realised sparsity is read from the patched runtime's counters while it runs the sparse model on
the text (masks on every token, CHESS_PREFILL=masked): the fraction of FFN channels, W_q inputs
and W_o inputs each stored level drops, per layer and overall, and the FFN fraction under CATS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as QT

from . import format as fmt
from .runtime import Context, Model
from .windows import bos_tokens, led_by_bos


def read_chess(path: str) -> dict:
    """CHESS metadata and threshold arrays of a converted file, validated like the patched loader does
    (format.read_chess); raises ValueError naming the file and the problem."""
    chk = fmt.read_chess(path)
    levels = [round(float(x), 6) for x in chk["levels"]]  # stored as f32
    layers: list[dict] = [{} for _ in range(chk["n_layer"])]  # a layer may lack some or all CHESS tensors
    for (il, kind), t in chk["tensors"].items():
        if kind in fmt.WT_KINDS:
            layers[il][kind] = {"type": "x4" if t.tensor_type == QT.I8 else t.tensor_type.name,  # chess_gguf/x4.py
                                "shape": [int(x) for x in t.shape]}
        else:
            layers[il][kind] = np.asarray(t.data, dtype=np.float32).reshape(len(levels), -1)  # [n_levels, n or 1]
    head = {}
    if chk["head"]:
        wt = chk["head"][fmt.HEAD_WT]
        head = {"thresholds": np.asarray(chk["head"][fmt.HEAD_THR].data, dtype=np.float32).tolist(),
                "type": wt.tensor_type.name, "shape": [int(x) for x in wt.shape]}
    return {"meta": chk["meta"], "levels": levels, "layers": layers, "head": head}


def threshold_summary(info: dict) -> list[dict]:
    rows = []
    for il, d in enumerate(info["layers"]):
        row = {"layer": il}
        for k, lv in enumerate(info["levels"]):
            tau = d.get("chess_ffn_tau")
            if tau is not None:
                t = tau[k][np.isfinite(tau[k])]
                row[f"tau_median@{lv}"] = float(np.median(t)) if t.size else float("inf")
            for part in ("chess_ffn_cats", "chess_thr_q", "chess_thr_o"):
                if part in d:
                    row[f"{part[6:]}@{lv}"] = float(d[part][k][0])
        rows.append(row)
    return rows


def measure_text(path: str, text: str, info: dict, *, ctx: int = 512, threads: Optional[int] = None,
                 max_tokens: int = 8192) -> dict:
    """Realised sparsity per level and part ({"ffn", "ffn_cats", "attn_q", "attn_o"}) on a text,
    read from the runtime's counters while it runs the sparse model with masks on every token."""
    model = Model(path)
    bos = bos_tokens(model)
    windows = led_by_bos(model.tokenize(text, add_special=False)[:max_tokens], ctx, bos)
    out = {"n_tokens": sum(len(w) for w in windows), "per_layer": {}, "overall": {}}
    with Context(model, n_ctx=ctx, n_batch=ctx, n_threads=threads) as c:
        for lv in info["levels"]:
            key = f"{lv:g}"
            out["overall"][key], out["per_layer"][key] = {}, {}
            for method, parts in (("chess", ("ffn", "attn_q", "attn_o", "head")), ("cats", ("ffn",))):
                c.chess_set(method, key, "masked")
                c.chess_stats_reset()
                for w in windows:
                    c.clear()
                    c.decode(bos + w, logits="compute")  # outputs for all rows: the last layer sees every token
                st = c.chess_stats()
                for part in parts:
                    name = "ffn_cats" if method == "cats" else part
                    out["overall"][key][name] = st[part]["sparsity"]
                    out["per_layer"][key][name] = st[part]["per_layer"]
    model.close()
    return out


def _transposed(layers: list[dict]) -> dict:
    """Type and shape of each kind of transposed copy, from the first layer that has it."""
    out: dict = {}
    for d in layers:
        for k, v in d.items():
            if k.startswith("chess_wt_"):
                out.setdefault(k, v)
    return out


def inspect(path: str, text_file: Optional[str] = None, *, threads: Optional[int] = None) -> dict:
    info = read_chess(path)
    res = {"file": str(path), "levels": info["levels"],
           "metadata": {k: (v if not isinstance(v, np.ndarray) else v.tolist()) for k, v in info["meta"].items()},
           "n_layers": len(info["layers"]), "thresholds": threshold_summary(info),
           "transposed": _transposed(info["layers"]), "head": info["head"]}
    if text_file:
        p = Path(text_file)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: text file not found")
        m = measure_text(path, p.read_text(encoding="utf-8", errors="replace"), info, threads=threads)
        res["text"] = str(p)
        res["n_tokens"] = m["n_tokens"]
        res["realised_sparsity"] = m["overall"]
        res["realised_sparsity_per_layer"] = m["per_layer"]
    return res


def print_report(res: dict) -> None:
    md = res["metadata"]
    print(f"{res['file']}: CHESS format {md.get('chess.version')}, levels {res['levels']} "
          f"(default {round(float(md.get('chess.default_level')), 6)}), statistic {md.get('chess.stat')}, "
          f"activation {md.get('chess.activation')}, {md.get('chess.calib_tokens')} calibration tokens, "
          f"{md.get('chess.tool_version')}")
    for k, v in res["transposed"].items():
        print(f"  {k}: {v['type']} {v['shape']}")
    if res.get("head"):
        h = res["head"]
        print(f"  output head: {h['type']} {h['shape']}, threshold on |h| per level "
              + ", ".join(f"{lv}: {t:.4g}" for lv, t in zip(res["levels"], h["thresholds"])) + " (0 = dense)")
    lv = res["levels"]
    mid = lv[len(lv) // 2]
    print(f"per-layer thresholds at level {mid}: layer  tau-median  cats  attn-q  attn-o")
    for r in res["thresholds"]:
        g = lambda k: r.get(f"{k}@{mid}", float("nan"))  # noqa: E731
        print(f"  {r['layer']:>3}  {g('tau_median'):.4f}  {g('ffn_cats'):.4f}  {g('thr_q'):.4f}  {g('thr_o'):.4f}")
    if "realised_sparsity" in res:
        print(f"realised sparsity on {res['text']} ({res['n_tokens']} tokens):")
        f = lambda x: f"{x:.3f}" if x is not None else "dense"  # noqa: E731
        print(f"  {'level':>5}  {'ffn(chess)':>10}  {'ffn(cats)':>10}  {'attn_q':>8}  {'attn_o':>8}  {'head':>6}")
        for k, v in res["realised_sparsity"].items():
            print(f"  {k:>5}  {f(v['ffn']):>10}  {f(v['ffn_cats']):>10}  {f(v['attn_q']):>8}  {f(v['attn_o']):>8}  "
                  f"{f(v.get('head')):>6}")
