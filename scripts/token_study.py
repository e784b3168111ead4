#!/usr/bin/env python3
"""How many calibration tokens are enough (issue #16 item 5; docs/measurements.md, "Calibration tokens").

  token_study.py ORIGINAL CONVERTED [--tokens 4096,8192,...] [--levels 0.5,0.7] [--eval-tokens 4096]

One calibration pass over the default calibration text in consecutive chunks whose ends are the
token counts (rounded up to whole statistics pieces of ctx - 1 tokens, so the running sums are what
a single `convert --calib-tokens N` gathers); after each chunk the thresholds of every part
(rule chess) are computed from the running totals, patched into a COPY of CONVERTED (a convert of
ORIGINAL: its transposed weights do not depend on the thresholds), and that file is scored on
held-out text (wiki_eval, books_eval: perplexity windows of 512, masks on every token) at each level:
perplexity and realised sparsity per part from the runtime's counters, plus the thresholds' distance
from the largest count's (computed at the end). Prints one JSON line per (tokens, level) and a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chess_gguf.calibrate import CalibStats, LayerStats, calibrate  # noqa: E402
from chess_gguf.convert import compute_thresholds, threshold_tensors  # noqa: E402
from chess_gguf.data import default_calib_path  # noqa: E402
from chess_gguf.evaluate import ppl_windows, read_ppl_text, resolve_ppl  # noqa: E402
from chess_gguf.runtime import Context, Model  # noqa: E402
from chess_gguf.windows import bos_tokens, window_nll  # noqa: E402

SUMMED = ("sum_abs_u", "sum_sq_u", "hist_a", "hist_cats", "hist_q", "hist_o")


def add(total: CalibStats, part: CalibStats) -> None:
    total.n_tokens += part.n_tokens
    if not total.layers:
        total.layers = [LayerStats() for _ in part.layers]
    for T, P in zip(total.layers, part.layers):
        for f in SUMMED:
            a, b = getattr(T, f), getattr(P, f)
            setattr(T, f, b.astype(np.float64 if f.startswith("sum") else np.int64) if a.size == 0 else a + b)


def patch_thresholds(path: Path, thr: list[dict]) -> None:
    from gguf import GGUFReader
    rd = GGUFReader(path, "r+")
    by = {t.name: t for t in rd.tensors}
    for name, arr, _ in threshold_tensors(thr, attention=True):
        d = by[name].data
        d[...] = arr.reshape(d.shape)
    rd.data.flush()


def score(path: Path, texts: dict, levels, threads: int, eval_tokens: int) -> list[dict]:
    """Per level (None = dense) and text: perplexity and realised sparsity per part."""
    model = Model(path)
    out = []
    try:
        with Context(model, n_ctx=512, n_batch=512, n_threads=threads) as c:
            for lv in levels:
                if lv is None:
                    c.chess_set(level="off")
                else:
                    c.chess_set("chess", f"{lv:g}", "masked")
                for name, text in texts.items():
                    c.chess_stats_reset()
                    nll = [window_nll(c, w) for w in ppl_windows(model, text, 512, eval_tokens)]
                    st = c.chess_stats()
                    out.append({"level": lv, "text": name,
                                "ppl": float(np.exp(sum(a for a, _ in nll) / sum(b for _, b in nll))),
                                **({} if lv is None else {
                                    **{f"sp_{p}": st[p]["sparsity"] for p in ("ffn", "attn_q", "attn_o")},
                                    "sp_ffn_layer_min": float(np.nanmin(st["ffn"]["per_layer"])),
                                    "sp_ffn_layer_max": float(np.nanmax(st["ffn"]["per_layer"]))})})
    finally:
        model.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("original")
    ap.add_argument("converted")
    ap.add_argument("--tokens", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--levels", default="0.5,0.7")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="perplexity tokens per text")
    ap.add_argument("--texts", default="wiki,books")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/token_study.gguf", help="the patched copy of CONVERTED")
    a = ap.parse_args()
    counts = [int(x) for x in a.tokens.split(",")]
    levels = [float(x) for x in a.levels.split(",")]
    work = Path(a.work)
    shutil.copyfile(a.converted, work)
    from gguf import GGUFReader
    file_levels = [round(float(x), 4) for x in GGUFReader(a.converted).fields["chess.levels"].contents()]
    texts = {n: read_ppl_text(p) for n, p in resolve_ppl(a.texts)}

    for r in score(work, texts, [None], a.threads, a.eval_tokens):
        print(json.dumps({"tokens": 0, **r}), flush=True)
        print(f"dense {r['text']}: ppl {r['ppl']:.4f}", file=sys.stderr)
    model = Model(a.original)
    piece = 512 - len(bos_tokens(model))
    toks = model.tokenize(Path(default_calib_path()).read_text(encoding="utf-8", errors="replace"), add_special=False)
    ends = [-(-n // piece) * piece for n in counts]
    if ends[-1] > len(toks):
        sys.exit(f"calibration text has {len(toks)} tokens, fewer than {ends[-1]}")
    total, rows, taus, start = CalibStats(), [], {}, 0
    for n, end in zip(counts, ends):
        t0 = time.perf_counter()
        add(total, calibrate(model, toks[start:end], ctx=512, threads=a.threads, progress=False))
        t_cal = time.perf_counter() - t0
        start = end
        thr = compute_thresholds(total, file_levels, "mean-abs", "chess")
        taus[n] = thr
        patch_thresholds(work, thr)
        t0 = time.perf_counter()
        for r in score(work, texts, levels, a.threads, a.eval_tokens):
            r.update(tokens=n, calib_tokens=total.n_tokens, calib_s=round(t_cal, 1),
                     eval_s=round(time.perf_counter() - t0, 1))
            rows.append(r)
            print(json.dumps(r), flush=True)
    model.close()
    big = taus[counts[-1]]
    ki = {lv: file_levels.index(lv) for lv in levels}
    for r in rows:  # mean over channels of |log(tau_N / tau_max)|, all layers
        k = ki[r["level"]]
        d = np.concatenate([np.abs(np.log(np.maximum(t["ffn_tau"][k], 1e-12) / np.maximum(b["ffn_tau"][k], 1e-12)))
                            for t, b in zip(taus[r["tokens"]], big)])
        r["tau_logdiff_mean"] = float(np.mean(d))
    print("\n| tokens | level | text | ppl | ffn sparsity [layer min..max] | attn q | attn o | mean abs log(tau/tau_max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['level']:g} | {r['text']} | {r['ppl']:.4f} | {r['sp_ffn']:.3f} "
              f"[{r['sp_ffn_layer_min']:.3f}..{r['sp_ffn_layer_max']:.3f}] | {r['sp_attn_q']:.3f} | "
              f"{r['sp_attn_o']:.3f} | {r['tau_logdiff_mean']:.4f} |")


if __name__ == "__main__":
    main()
