"""`inspect`: CHESS metadata, per-layer threshold statistics, and realised sparsity on a text.

Realised sparsity is measured on the runtime's own activations (eval callback on the dense
graph): the fraction of FFN channels (|act(g_i)| < tau_i), W_q inputs and W_o inputs that each
stored level drops, per layer and overall.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from . import gguf_io
from .calibrate import arch_of
from .runtime import Context, Model
from .thresholds import act

TENSOR_RE = re.compile(r"^blk\.(\d+)\.(chess_\w+)$")


def read_chess(path: str) -> dict:
    """CHESS metadata and threshold arrays of a converted file (raises ValueError if not CHESS)."""
    r = gguf_io.read(path)
    if gguf_io.field_value(r, "chess.version") is None:
        raise ValueError(f"{path}: not a CHESS file (no chess.version key): run `python -m chess_gguf convert` first")
    meta = {k: r.fields[k].contents() for k in r.fields if k.startswith("chess.")}
    levels = [round(float(x), 6) for x in meta["chess.levels"]]  # stored as f32
    layers: dict[int, dict] = {}
    for t in r.tensors:
        m = TENSOR_RE.match(t.name)
        if not m:
            continue
        il, kind = int(m.group(1)), m.group(2)
        d = layers.setdefault(il, {})
        if kind.startswith("chess_wt_"):
            d[kind] = {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]}
        else:
            arr = np.asarray(t.data, dtype=np.float32).reshape(len(levels), -1)  # [n_levels, n or 1]
            d[kind] = arr
    return {"meta": meta, "levels": levels, "layers": [layers[i] for i in sorted(layers)]}


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
                 max_tokens: int = 16384) -> dict:
    """Realised sparsity per level and part ({"ffn", "ffn_cats", "attn_q", "attn_o"}) on a text."""
    model = Model(path)
    _, kind = arch_of(model)
    levels = info["levels"]
    n_lv = len(levels)
    L = info["layers"]
    cnt = {p: np.zeros((n_lv, len(L))) for p in ("ffn", "ffn_cats", "attn_q", "attn_o")}
    tot = {p: np.zeros(len(L)) for p in cnt}
    node = re.compile(r"^(ffn_gate|attn_norm|kqv_out)-(\d+)$")
    skip = 1 if model.add_bos else 0

    def on(name, x):
        k, il = node.match(name).groups()
        il = int(il)
        x = x[skip:]
        d = L[il]
        if k == "ffn_gate":
            a = np.abs(act(x, kind))
            for lv in range(n_lv):
                if "chess_ffn_tau" in d:
                    cnt["ffn"][lv, il] += np.count_nonzero(a < d["chess_ffn_tau"][lv][None, :])
                if "chess_ffn_cats" in d:
                    cnt["ffn_cats"][lv, il] += np.count_nonzero(a < d["chess_ffn_cats"][lv][0])
            tot["ffn"][il] += a.size
            tot["ffn_cats"][il] += a.size
        else:
            x = np.abs(x)
            part, key = ("attn_q", "chess_thr_q") if k == "attn_norm" else ("attn_o", "chess_thr_o")
            if key in d:
                for lv in range(n_lv):
                    cnt[part][lv, il] += np.count_nonzero(x < d[key][lv][0])
            tot[part][il] += x.size

    toks = model.tokenize(text, add_special=False)[:max_tokens]
    win = ctx - skip
    bos = model.tokenize("", add_special=True)[:skip]
    with Context(model, n_ctx=ctx, n_batch=ctx, n_threads=threads,
                 eval_callback=(lambda n: node.match(n) is not None, on)) as c:
        for s in range(0, len(toks), win):
            w = toks[s:s + win]
            if len(w) < 8:
                continue
            c.clear()
            c.decode(bos + w, logits="compute")
    model.close()
    out = {"n_tokens": len(toks), "per_layer": {}, "overall": {}}
    for k, lv in enumerate(levels):
        key = f"{lv:g}"
        out["per_layer"][key] = {p: (cnt[p][k] / np.maximum(tot[p], 1)).tolist() for p in cnt}
        out["overall"][key] = {p: float(cnt[p][k].sum() / max(tot[p].sum(), 1)) for p in cnt}
    return out


def inspect(path: str, text_file: Optional[str] = None, *, threads: Optional[int] = None) -> dict:
    info = read_chess(path)
    res = {"file": str(path), "levels": info["levels"],
           "metadata": {k: (v if not isinstance(v, np.ndarray) else v.tolist()) for k, v in info["meta"].items()},
           "n_layers": len(info["layers"]), "thresholds": threshold_summary(info),
           "transposed": {k: v for k, v in info["layers"][0].items() if k.startswith("chess_wt_")} if info["layers"] else {}}
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
    lv = res["levels"]
    mid = lv[len(lv) // 2]
    print(f"per-layer thresholds at level {mid}: layer  tau-median  cats  attn-q  attn-o")
    for r in res["thresholds"]:
        g = lambda k: r.get(f"{k}@{mid}", float("nan"))  # noqa: E731
        print(f"  {r['layer']:>3}  {g('tau_median'):.4f}  {g('ffn_cats'):.4f}  {g('thr_q'):.4f}  {g('thr_o'):.4f}")
    if "realised_sparsity" in res:
        print(f"realised sparsity on {res['text']} ({res['n_tokens']} tokens):")
        print(f"  {'level':>5}  {'ffn(chess)':>10}  {'ffn(cats)':>10}  {'attn_q':>8}  {'attn_o':>8}")
        for k, v in res["realised_sparsity"].items():
            print(f"  {k:>5}  {v['ffn']:>10.3f}  {v['ffn_cats']:>10.3f}  {v['attn_q']:>8.3f}  {v['attn_o']:>8.3f}")
