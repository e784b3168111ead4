"""Issue #19 candidate: an input-sparse output head, measured offline before any runtime work.

The output head reads the most weight bytes of any single matmul in a decoded token (SmolLM2: its
tied Q8_0 embedding, 31% of the bytes; Qwen2.5-0.5B: output.weight, 37%), and CHESS leaves it
dense. Input sparsity on it (drop channels j of the final normed hidden state h with a small score,
as the runtime's W_q/W_o path does) saves (1 - kept) of its bytes through a transposed copy.

The head is the graph's last op, so its effect is exact offline: logits = (h * keep) @ W^T with W
dequantized in numpy, h captured through the eval callback (node result_norm) while the runtime
decodes the same windows as `eval --kld`, and the KLD taken against the file's own dense logits
(chess_gguf.kld). With a converted FILE, every stored level of --method runs with masks on every
token (eval's protocol) and the head's sparsity is added on top, so each line of the output is one
point of the bytes / KLD frontier (bytes: bench's decode_bytes at the realised sparsities, the head
counted at its kept fraction). Thresholds are fitted on calibration text (quantiles of the score
over tokens and channels), realised sparsity is measured on the evaluation text.

    python scripts/head_study.py FILE [--text wiki] [--windows 8] [--head 0,0.2,0.3,0.4,0.5] [--json OUT]

Scores: |h_j| (one scalar threshold), |h_j| * ||W[:, j]|| (the channel's column norm: the size of its
contribution to the logits; default). --requant also reports the dense KLD of a Q8_0 transposed
copy (the second rounding a runtime copy would add).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chess_gguf import bench, data, kld, runtime as rt, windows as W  # noqa: E402
from chess_gguf import format as fmt  # noqa: E402
from chess_gguf.gguf_io import read  # noqa: E402

CTX = 512


def run_windows(model, text: Path, n: int, threads: int, method=None, level=None):
    """(scored logits, the head inputs of the same rows, realised sparsities, targets) of n perplexity windows."""
    rows: list[np.ndarray] = []
    logits, hs, targets = [], [], []
    ctx = rt.Context(model, n_ctx=CTX, n_batch=CTX, n_threads=threads,
                     eval_callback=(lambda name: name == "result_norm", lambda name, a: rows.append(a.copy())))
    try:
        if level is not None:
            ctx.chess_set(method=method, level=level, prefill="masked")
            ctx.chess_stats_reset()
        toks = model.tokenize(text.read_text(encoding="utf-8"))
        for w in W.bos_replacing(toks, CTX, W.bos_tokens(model), n):
            rows.clear()
            lg = W.window_logits(ctx, w)
            h = np.concatenate(rows)  # one row per logits row decoded; window_logits drops the last
            logits.append(lg)
            hs.append(h[len(h) - len(lg) - 1:-1])
            targets.extend(w[len(w) // 2 + 1:])
        stats = ctx.chess_stats() if level is not None else {}
    finally:
        ctx.close()
    return np.concatenate(logits), np.concatenate(hs), stats, targets


def q8_0_roundtrip(wt: np.ndarray) -> np.ndarray:
    """wt [n_in, n_out] quantized to Q8_0 along n_out and back (what a transposed copy stores)."""
    from gguf.quants import dequantize, quantize
    from gguf import GGMLQuantizationType as QT
    return dequantize(quantize(wt, QT.Q8_0), QT.Q8_0).reshape(wt.shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--text", default="wiki", help="evaluation text name (data.py) or path (default wiki)")
    ap.add_argument("--calib", default=None, help="threshold-fitting text (default data/wiki_calib.txt)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--head", default="0,0.2,0.3,0.4,0.5", help="head sparsities (fitted on --calib)")
    ap.add_argument("--method", default="chess")
    ap.add_argument("--score", choices=["abs", "colnorm"], default="colnorm")
    ap.add_argument("--requant", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    text = Path(a.text) if Path(a.text).exists() else data.domain_path(a.text)
    calib = Path(a.calib) if a.calib else data.default_calib_path()
    model = rt.Model(a.file)
    reader = read(a.file)
    info = bench.read_file(a.file)
    tensors = info["tensors"]
    if fmt.HEAD_THR in tensors:
        sys.exit(f"{a.file}: has a CHESS head already (the study applies its own to a file without one)")
    hname = fmt.head_weight(tensors)
    wh = fmt.tensor_f32(reader, hname)  # [vocab, n_embd]
    colnorm = np.linalg.norm(wh, axis=0)
    score = (lambda h: np.abs(h) * colnorm) if a.score == "colnorm" else np.abs
    _, h_cal, _, _ = run_windows(model, calib, a.windows, a.threads)
    cal = score(h_cal).ravel()
    head_levels = [float(x) for x in a.head.split(",")]
    thr = {s: (np.quantile(cal, s) if s > 0 else -np.inf) for s in head_levels}
    dense, h_dense, _, targets = run_windows(model, text, a.windows, a.threads)

    def ppl(lg):
        return float(np.exp(-W.log_softmax_at(lg, targets).mean()))

    head_bytes = tensors[hname]
    out = {"file": a.file, "head": hname, "head_mb": head_bytes / 1e6, "text": str(text), "rows": []}
    print(f"{a.file}: head {hname} {tuple(wh.shape)} {head_bytes / 1e6:.1f} MB; {len(dense)} scored tokens of {text.name}")
    err = float(np.abs(h_dense @ wh.T - dense).max())
    out["check_max_diff"], out["logit_max"] = err, float(np.abs(dense).max())
    print(f"check: numpy head vs runtime logits, max |diff| {err:.3f} (runtime rounds h to Q8_0)")
    if a.requant:
        wq = q8_0_roundtrip(np.ascontiguousarray(wh.T)).T
        k, top = kld.token_kld(dense, h_dense @ wh.T)
        kq, topq = kld.token_kld(dense, h_dense @ wq.T)
        print(f"requantized Q8_0 transposed head, dense: KLD {kq.mean():.5f} (numpy head itself {k.mean():.5f}), same top {topq.mean() * 100:.1f}%")
        out["requant_kld"] = float(kq.mean())
    levels = [None] + (list(model.chess_levels) if model.chess_levels else [])
    print(f"{'level':>6} {'head':>5} {'head real':>9} {'MB/tok':>7} {'KLD':>7} {'same top':>8} {'ppl':>8}")
    for lv in levels:
        if lv is None:
            base, h, st, sp = dense, h_dense, {}, None
        else:
            base, h, st, _ = run_windows(model, text, a.windows, a.threads, a.method, lv)
            sp = {p: st[bench.STATS_PART[p]]["per_layer"] for p in bench.SPARSE_PARTS[a.method]}
        body = bench.decode_bytes(tensors, a.method if lv is not None else None, sp, info["fixed"]) - head_bytes
        for s in head_levels:
            keep = score(h) >= thr[s]
            lg = (h * keep) @ wh.T if s > 0 else base
            k, top = kld.token_kld(dense, lg)
            p = ppl(lg)
            real = 1.0 - float(keep.mean())
            mb = (body + head_bytes * (1.0 - real)) / 1e6
            print(f"{'off' if lv is None else lv:>6} {s:>5.2f} {real:>9.3f} {mb:>7.1f} {k.mean():>7.4f} {top.mean() * 100:>7.1f}% {p:>8.3f}")
            out["rows"].append({"level": lv, "head": s, "head_realised": real, "mb_per_token": mb,
                                "kld": float(k.mean()), "same_top": float(top.mean()),
                                "ppl": p, "sparsity": sp})
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
