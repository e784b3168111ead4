#!/usr/bin/env python3
"""Offline study of FFN threshold rules across text domains (issue #9; docs/results.md, "Beyond
the paper: robust thresholds").

  collect MODEL NAME TEXT [--tokens N] [--stride K]
      run TEXT through MODEL (the patched runtime's eval callback) and keep every K-th token's
      act(gate) and up rows of every layer (signed, float16) in out/rows/<model>/<NAME>/;
      also W_down (dequantized, float32) once per model.
  score MODEL --calib NAME[+NAME] --eval NAME[,NAME...] [--levels 0.5,0.7] [--rules ...]
      fit each rule's thresholds on the calibration rows, apply them to each evaluation set, and print
      per rule x level x domain: realised FFN sparsity and the relative FFN output error
      sum ||W_down (drop * act(g) * u)||^2 / sum ||W_down (act(g) * u)||^2, averaged over layers;
      also the error at the domain's OWN quantile (each rule's ranking at exactly the level).

Nothing here is used by convert; it is the measurement that chose the rule convert ships.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chess_gguf import thresholds as T  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "out" / "rows"


def model_key(path: str) -> str:
    return Path(path).name.split(".Q")[0]


def collect(args) -> None:
    from chess_gguf import format as fmt, gguf_io
    from chess_gguf.calibrate import arch_of
    from chess_gguf.runtime import Context, Model

    d = ROOT / model_key(args.model)
    model = Model(args.model)
    _, kind = arch_of(model)
    wd = d / "w_down.npy"
    if not wd.exists():
        d.mkdir(parents=True, exist_ok=True)
        reader = gguf_io.read(Path(args.model))
        np.save(wd, np.stack([fmt.tensor_f32(reader, f"blk.{i}.ffn_down.weight") for i in range(model.n_layer)]))
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    toks = model.tokenize(text, add_special=False)[: args.tokens]
    ctx_len = args.ctx
    win = ctx_len - 1 if model.add_bos else ctx_len
    bos = model.tokenize("", add_special=True)[:1] if model.add_bos else []
    windows = [toks[s:s + win] for s in range(0, len(toks), win)]
    windows = [w for w in windows if len(w) >= 8]
    n_layer = model.n_layer
    rows = {(k, i): [] for k in "gur" for i in range(n_layer)}
    cur = {"keep": None}

    def on(name: str, x: np.ndarray) -> None:
        k, il = name.split("-")
        x = x[len(bos):][cur["keep"]]
        if k == "ffn_gate":
            rows[("g", int(il))].append(T.act(x, kind).astype(np.float16))
        elif k == "ffn_inp":  # the residual stream the FFN output is added to: its row norms
            rows[("r", int(il))].append(np.linalg.norm(x, axis=1).astype(np.float32))
        else:
            rows[("u", int(il))].append(x.astype(np.float16))

    wants = lambda n: n.split("-")[0] in ("ffn_gate", "ffn_up", "ffn_inp") and n.count("-") == 1  # noqa: E731
    t0 = time.time()
    with Context(model, n_ctx=ctx_len, n_batch=ctx_len, n_threads=args.threads, eval_callback=(wants, on)) as c:
        g0 = 0
        for w in windows:
            idx = np.arange(g0, g0 + len(w))
            cur["keep"] = np.nonzero(idx % args.stride == 0)[0]
            c.clear()
            c.decode(bos + list(w), logits="compute")
            g0 += len(w)
    out = d / args.name
    out.mkdir(parents=True, exist_ok=True)
    for (k, il), v in rows.items():
        if v:
            np.save(out / f"{k}{il}.npy", np.concatenate(v))
    (out / "meta.json").write_text(json.dumps({"text": args.text, "tokens": g0, "stride": args.stride,
                                               "rows": int(sum(len(v) for v in rows[("g", 0)])), "act": kind}))
    print(f"{out}: {g0} tokens, {sum(len(v) for v in rows[('g', 0)])} rows, {time.time() - t0:.0f} s")
    model.close()


# --- scoring ----------------------------------------------------------------------------------

def load(d: Path, name: str, il: int):
    parts = name.split("+")
    g = np.concatenate([np.load(d / p / f"g{il}.npy") for p in parts]).astype(np.float32)
    u = np.concatenate([np.load(d / p / f"u{il}.npy") for p in parts]).astype(np.float32)
    return g, u


def ffn_err(g, u, keep, Wd):
    """Relative squared error of the FFN output, sum over rows / sum of dense output norms."""
    h = g * u
    y = h @ Wd.T
    e = (h * ~keep) @ Wd.T
    return float((e * e).sum() / (y * y).sum())


COND_EDGES = np.exp(np.linspace(np.log(1e-4), np.log(1e2), 49))  # coarse |a| bins for conditional stats


def rule_weights(rule: str, g, u, c):
    """Per-channel weight w_i (score = |a_i| * w_i) fitted on calibration rows g = act(gate), u."""
    au = np.abs(u)
    m = au.mean(0)
    rms = np.sqrt((u * u).mean(0))
    if rule == "cats":
        return np.ones_like(m)
    if rule == "chess":
        return m
    if rule == "chess-rms":
        return rms
    if rule == "median":
        return np.median(au, 0)
    if rule == "wnorm":
        return c
    if rule.startswith("pow"):          # pow0.5: m^0.5
        return m ** float(rule[3:])
    if rule.startswith("wpow"):         # wpow0.5: c * m^0.5
        return c * m ** float(rule[4:])
    if rule in ("wchess", "gchess"):  # gchess: patch() replaces c by the next norm's weighted column norms
        return c * m
    if rule == "wrms":
        return c * rms
    if rule == "aw":                    # |a|-weighted mean of |u|: E[|a||u|] / E[|a|]
        return (np.abs(g) * au).mean(0) / np.maximum(np.abs(g).mean(0), 1e-30)
    if rule == "waw":
        return c * (np.abs(g) * au).mean(0) / np.maximum(np.abs(g).mean(0), 1e-30)
    raise ValueError(rule)


def cond_tau(g, u, c, level, iters=4, shrink=0.0):
    """Conditional rule: tau_i = T / (c_i * r_i(tau_i)), r_i = RMS of u_i over rows with |a_i| near tau_i
    (coarse log bins, each bin's value shrunk toward the channel's overall RMS when it has few rows)."""
    a = np.abs(g)
    nb = len(COND_EDGES) - 1
    bi = np.clip(np.searchsorted(COND_EDGES, a) - 1, 0, nb - 1)
    C = g.shape[1]
    flat = bi + nb * np.arange(C)[None, :]
    cnt = np.bincount(flat.ravel(), minlength=C * nb).reshape(C, nb).astype(np.float64)
    s2 = np.bincount(flat.ravel(), weights=(u.astype(np.float64) ** 2).ravel(), minlength=C * nb).reshape(C, nb)
    rms = np.sqrt((u.astype(np.float64) ** 2).mean(0))
    k = 20.0  # prior weight (rows) of the channel RMS
    r_bin = np.sqrt((s2 + k * rms[:, None] ** 2) / (cnt + k))
    w = c * rms
    for _ in range(iters):
        Tq = np.quantile((a * w[None, :]).ravel(), level)
        tau = Tq / w
        j = np.clip(np.searchsorted(COND_EDGES, tau) - 1, 0, nb - 1)
        w = c * r_bin[np.arange(C), j]
    Tq = np.quantile((a * w[None, :]).ravel(), level)
    return Tq / w, w


def score(args) -> None:
    d = ROOT / model_key(args.model)
    Wd_all = np.load(d / "w_down.npy", mmap_mode="r")
    n_layer = Wd_all.shape[0]
    levels = [float(x) for x in args.levels.split(",")]
    evals = args.eval.split(",")
    rules = args.rules.split(",")
    layers = range(n_layer) if not args.layers else [int(x) for x in args.layers.split(",")]
    # res[rule][level][domain] = lists over layers of (sparsity, err, err_own)
    res = {r: {lv: {e: [] for e in evals} for lv in levels} for r in rules}
    for il in layers:
        Wd = np.asarray(Wd_all[il], dtype=np.float32)
        c = np.linalg.norm(Wd, axis=0)
        gc, uc = load(d, args.calib, il)
        ev = {e: load(d, e, il) for e in evals}
        for r in rules:
            for lv in levels:
                if r == "cond":
                    tau, w = cond_tau(gc, uc, c, lv)
                elif r.startswith("oracle"):
                    tau = w = None
                else:
                    w = rule_weights(r, gc, uc, c).astype(np.float64)
                    Tq = np.quantile((np.abs(gc) * w[None, :]).ravel(), lv)
                    tau = np.where(w > 0, Tq / np.maximum(w, 1e-300), np.inf)
                for e in evals:
                    g, u = ev[e]
                    a = np.abs(g)
                    if r == "oracle":  # per-token |a u| c, exact level on the domain: not deployable
                        sc = a * np.abs(u) * c[None, :]
                        keep = sc >= np.quantile(sc, lv)
                        res[r][lv][e].append((float(np.mean(~keep)), ffn_err(g, u, keep, Wd), ffn_err(g, u, keep, Wd)))
                        continue
                    if r == "oracle-dom":  # CHESS with m from the evaluation domain itself
                        w2 = np.abs(u).mean(0)
                        keep = a * w2 >= np.quantile(a * w2, lv)
                        res[r][lv][e].append((float(np.mean(~keep)), ffn_err(g, u, keep, Wd), ffn_err(g, u, keep, Wd)))
                        continue
                    keep = a >= tau[None, :]
                    sc = a * w[None, :]
                    keep_own = sc >= np.quantile(sc, lv)
                    res[r][lv][e].append((float(np.mean(~keep)), ffn_err(g, u, keep, Wd), ffn_err(g, u, keep_own, Wd)))
        print(f"layer {il} done", file=sys.stderr, flush=True)
    print(f"calib {args.calib}; mean over layers of: realised sparsity / rel. FFN output error at the calibrated "
          f"thresholds / rel. error at the domain's own quantile (exact level)")
    for lv in levels:
        print(f"\nlevel {lv}")
        print(f"{'rule':>12} " + " ".join(f"{e:>26}" for e in evals) + f" {'mean err':>9} {'vs chess':>8}")
        base = None
        for r in rules:
            cells, errs = [], []
            for e in evals:
                x = np.array(res[r][lv][e])
                cells.append(f"{x[:, 0].mean():.3f} {x[:, 1].mean():.4f} {x[:, 2].mean():.4f}")
                errs.append(x[:, 2].mean())
            me = float(np.mean(errs))
            if r == "chess":
                base = me
            print(f"{r:>12} " + " ".join(f"{cc:>26}" for cc in cells) + f" {me:9.4f}"
                  + (f" {me / base:8.3f}" if base else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({r: {str(lv): v for lv, v in x.items()} for r, x in res.items()}))


def patch(args) -> None:
    """Copy a converted file and overwrite its chess_ffn_tau with `rule` thresholds fitted on calibration
    rows, optionally with a per-layer budget (greedy on FFN output error / residual stream norm)."""
    import shutil
    from gguf import GGUFReader
    d = ROOT / model_key(args.src)
    Wd_all = np.load(d / "w_down.npy", mmap_mode="r")
    n_layer = Wd_all.shape[0]
    shutil.copyfile(args.src, args.out)
    rd = GGUFReader(args.out, "r+")
    levels = [float(x) for x in rd.fields["chess.levels"].contents()]
    taus = {t.name: t for t in rd.tensors if t.name.endswith("chess_ffn_tau")}
    grid = np.round(np.arange(0.05, 0.951, 0.025), 4)
    per_layer = []
    cost = np.zeros((n_layer, len(grid)))
    for il in range(n_layer):
        Wd = np.asarray(Wd_all[il], dtype=np.float32)
        c = np.linalg.norm(Wd, axis=0)
        g, u = load(d, args.calib, il)
        if args.rule.startswith("mc:"):  # mc:A:B = m^A * ||W_down[:, i]||^B (m from the file with --m-from-file)
            A, B = (float(x) for x in args.rule.split(":")[1:])
            m_ = np.abs(u).mean(0).astype(np.float64)
            if args.m_from_file:
                src_tau = np.asarray(taus[f"blk.{il}.chess_ffn_tau"].data, dtype=np.float64).reshape(len(levels), -1)
                m_ = np.where(np.isfinite(src_tau[0]), 1.0 / src_tau[0], 0.0)
            w = m_ ** A * c ** B
            per_layer.append((np.abs(g), w))
            print(f"layer {il}", file=sys.stderr, flush=True)
            continue
        w = rule_weights(args.rule, g, u, c).astype(np.float64)
        if args.m_from_file:  # m_i from the source file's paper thresholds (all its calibration tokens):
            src_tau = np.asarray(taus[f"blk.{il}.chess_ffn_tau"].data, dtype=np.float64).reshape(len(levels), -1)
            m_file = np.where(np.isfinite(src_tau[0]), 1.0 / src_tau[0], 0.0)  # tau_i = T / m_i
            w = {"chess": m_file, "wchess": m_file * c, "cats": np.ones_like(m_file)}.get(args.rule, w)
        if args.rule in ("gchess", "gchess-file"):
            # the next RMSNorm's weights: a residual error e reaches the next layer as gamma * e / rms
            nxt = f"blk.{il + 1}.attn_norm.weight" if il + 1 < n_layer else "output_norm.weight"
            gam = np.asarray(next(t for t in rd.tensors if t.name == nxt).data, dtype=np.float64).ravel()
            cg = np.linalg.norm(Wd * gam[:, None], axis=0)
            m_ = np.abs(u).mean(0)
            if args.m_from_file:
                src_tau = np.asarray(taus[f"blk.{il}.chess_ffn_tau"].data, dtype=np.float64).reshape(len(levels), -1)
                m_ = np.where(np.isfinite(src_tau[0]), 1.0 / src_tau[0], 0.0)
            w = m_ * cg
        per_layer.append((np.abs(g), w))
        if args.budget in ("resid", "ffnrel"):
            rows = slice(0, len(g), max(1, len(g) // args.budget_rows))
            r2 = float(np.mean(np.load(d / args.resid / f"r{il}.npy").astype(np.float64) ** 2))
            y2 = float(np.mean(np.square((g[rows] * u[rows]) @ Wd.T, dtype=np.float64).sum(1)))
            den = (r2 + y2) if args.budget == "resid" else y2  # ffnrel: relative to the FFN output itself
            e = T.error_curve(g[rows], u[rows], w, Wd, grid) / (len(g[rows]) * den)
            cost[il] = e
        print(f"layer {il}", file=sys.stderr, flush=True)
    alloc = {}
    if args.budget == "sens":  # end-to-end per-layer NLL curves from `sensitivity`
        sj = json.loads((d / "sens.json").read_text())
        sg = np.array(sj["grid"])
        grid = np.round(np.arange(sg[0], sg[-1] + 1e-9, 0.025), 4)
        cost = np.stack([np.interp(grid, sg, np.maximum.accumulate(np.array(r))) for r in sj["nll"]])
    for lv in levels:
        if args.budget == "sens":
            alloc[lv] = T.greedy_budget(cost, grid, lv, lo=max(grid[0], lv - args.span), hi=min(grid[-1], lv + args.span))
        elif args.budget == "none":
            alloc[lv] = np.full(n_layer, lv)
        else:
            alloc[lv] = T.greedy_budget(cost, grid, lv, lo=max(0.05, lv - args.span), hi=min(0.95, lv + args.span))
        print(f"level {lv}: per-layer " + " ".join(f"{x:.2f}" for x in alloc[lv]))
    for il in range(n_layer):
        a, w = per_layer[il]
        sc = a * w[None, :]
        t = taus[f"blk.{il}.chess_ffn_tau"]
        new = np.stack([np.where(w > 0, np.quantile(sc, alloc[lv][il]) / np.maximum(w, 1e-300), np.inf)
                        for lv in levels]).astype(np.float32)
        t.data[...] = new.reshape(t.data.shape)
    rd.data.flush()
    if args.budget != "none":
        np.save(str(args.out) + ".cost.npy", cost)
    print(f"wrote {args.out}")


def sensitivity(args) -> None:
    """End-to-end per-layer sensitivity: NLL on held-out calibration text (the END of the calibration file,
    beyond the tokens convert uses) when only layer l's FFN is sparse, at each sparsity of the grid
    (paper rule, m from the file). Writes out/rows/<model>/sens.json: {"dense": nll, "grid": [...],
    "nll": [[per layer per grid]]}."""
    import shutil
    from gguf import GGUFReader
    from chess_gguf.evaluate import ppl_windows
    from chess_gguf.windows import window_nll
    from chess_gguf.runtime import Context, Model
    d = ROOT / model_key(args.src)
    grid = [float(x) for x in args.grid.split(",")]
    tmp = Path(args.tmp)
    shutil.copyfile(args.src, tmp)
    rd = GGUFReader(tmp, "r+")
    levels = [float(x) for x in rd.fields["chess.levels"].contents()]
    if len(grid) > len(levels):
        raise SystemExit("grid longer than the file's levels")
    taus = {t.name: t for t in rd.tensors if t.name.endswith("chess_ffn_tau")}
    n_layer = len(taus)
    orig = {k: np.array(v.data, dtype=np.float64).reshape(len(levels), -1) for k, v in taus.items()}
    new_cols = {}
    for il in range(n_layer):
        tau0 = orig[f"blk.{il}.chess_ffn_tau"][0]
        m = np.where(np.isfinite(tau0), 1.0 / tau0, 0.0)
        g, _ = load(d, args.calib, il)
        sc = np.abs(g) * m[None, :]
        cols = [np.where(m > 0, np.quantile(sc, s_) / np.maximum(m, 1e-300), np.inf) for s_ in grid]
        cols += [cols[-1]] * (len(levels) - len(grid))
        new_cols[il] = np.stack(cols).astype(np.float32)
    text = Path(args.text).read_text(encoding="utf-8")[-args.chars:]
    res = {"grid": grid, "nll": [], "text": args.text, "chars": args.chars}

    def run(label):
        model = Model(tmp)
        wins = ppl_windows(model, text, 512, args.tokens)
        with Context(model, n_ctx=512, n_batch=512, n_threads=1) as c:
            out = []
            for k in range(len(grid) if label != "dense" else 1):
                if label == "dense":
                    c.chess_set(level="off")
                else:
                    c.chess_set("chess-ffn", f"{levels[k]:g}", "masked")
                nll = cnt = 0
                for w in wins:
                    a, b = window_nll(c, w)
                    nll, cnt = nll + a, cnt + b
                out.append(nll / cnt)
        model.close()
        return out

    res["dense"] = run("dense")[0]
    for il in range(n_layer):
        for jl in range(n_layer):
            taus[f"blk.{jl}.chess_ffn_tau"].data[...] = (new_cols[jl] if jl == il else
                                                          np.zeros_like(new_cols[jl])).reshape(taus[f"blk.{jl}.chess_ffn_tau"].data.shape)
        rd.data.flush()
        res["nll"].append(run("layer"))
        print(f"layer {il}: " + " ".join(f"{x - res['dense']:+.4f}" for x in res["nll"][-1]), flush=True)
    (d / "sens.json").write_text(json.dumps(res))
    tmp.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("model")
    c.add_argument("name")
    c.add_argument("text")
    c.add_argument("--tokens", type=int, default=16384)
    c.add_argument("--stride", type=int, default=8)
    c.add_argument("--ctx", type=int, default=512)
    c.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("score")
    s.add_argument("model")
    s.add_argument("--calib", default="wiki_calib")
    s.add_argument("--eval", default="wiki_eval,books_eval,news_eval,science_eval")
    s.add_argument("--levels", default="0.5,0.7")
    s.add_argument("--rules", default="cats,chess,chess-rms,wnorm,wchess,wrms,cond,oracle-dom,oracle")
    s.add_argument("--layers", default="")
    s.add_argument("--json", default="")
    pt = sub.add_parser("patch")
    pt.add_argument("src")
    pt.add_argument("out")
    pt.add_argument("--rule", default="chess")
    pt.add_argument("--calib", default="wiki_calib")
    pt.add_argument("--budget", default="none", choices=["none", "resid", "ffnrel", "sens"])
    pt.add_argument("--resid", default="wiki_calib_short")
    pt.add_argument("--budget-rows", type=int, default=512)
    pt.add_argument("--span", type=float, default=0.2)
    pt.add_argument("--m-from-file", action="store_true")
    se = sub.add_parser("sensitivity")
    se.add_argument("src")
    se.add_argument("--tmp", default="out/sens.tmp.gguf")
    se.add_argument("--calib", default="wiki_calib")
    se.add_argument("--grid", default="0.3,0.5,0.7,0.9")
    se.add_argument("--text", default="data/wiki_calib.txt")
    se.add_argument("--chars", type=int, default=12000)
    se.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    if args.cmd == "sensitivity":
        sensitivity(args)
    elif args.cmd == "collect":
        collect(args)
    elif args.cmd == "patch":
        patch(args)
    else:
        score(args)


if __name__ == "__main__":
    main()
