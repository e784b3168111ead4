"""`bench`: decode and prompt speed of a CHESS file per (method, level), against `off`.

End to end (the default): one Context, one binary, runs interleaved round by round
(off, 0.5, 0.7, off, 0.5, 0.7, ...) so that drifting machine load hits every setting alike.
  decode  like llama-bench's tg: clear the KV cache, decode an 8-token prompt of real text, then
          time DECODE single-token decode calls (128; fixed real-text tokens, one call each);
  prompt  like llama-bench's pp: clear the KV cache, time one decode of PROMPT tokens (256).
Reported: per-setting medians (tok/s) over the rounds, the ratio of each median to the `off`
median, the realised sparsity of the decoded tokens (the runtime's counters), and the ideal
speedup: weight bytes read per decoded token dense / sparse at that realised sparsity.

Layouts: several files of one model (e.g. `--layout dual` and `--layout compact` conversions) and
--original (the unconverted model) are loaded in the same process and all their settings are
interleaved in every round; each file is also compared with the original's dense medians, and
with --memory its file size and peak resident memory while decoding (a child llama-simple per
file, measured from its rusage) are reported against the original's.

With --kernels: the native kernel benchmark (chess-bench-kernels) for each level's kept fraction
and thread counts 1 and --threads, instead of the end-to-end runs.

Only the standard library is imported at module level (the CLI builds its parser from here).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .options import METHODS, PREFILLS, arg, parse_levels, parse_methods, positive_int

# Which parts each method sparsifies (names of the realised-sparsity dict).
SPARSE_PARTS = {"chess": ("ffn", "q", "o", "head"), "chess-ffn": ("ffn",), "cats": ("ffn",)}
# realised-sparsity name -> Context.chess_stats() name
STATS_PART = {"ffn": "ffn", "q": "attn_q", "o": "attn_o", "head": "head"}
PREFIX_TOKENS = 8
DENSE = "dense"  # the method name of the `off` run (one dense run serves every method)
KERNEL_BIN = "chess-bench-kernels"
MEMORY_BIN = "llama-simple"  # --memory: its peak RSS generating MEMORY_TOKENS tokens from MEMORY_PROMPT
MEMORY_PROMPT = "The history of the city begins in the Roman period, when a small settlement grew around"
MEMORY_TOKENS = 64

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


# --- pure arithmetic ----------------------------------------------------------------------------

def _part_sparsity(sparsity: Mapping | None, part: str, il: int) -> float:
    """Sparsity of one part in layer il: a per-layer list entry, else a scalar; missing or NaN = 0."""
    v = (sparsity or {}).get(part)
    if hasattr(v, "__len__"):
        v = v[il] if il < len(v) else None
    if v is None or math.isnan(float(v)):
        return 0.0
    return min(max(float(v), 0.0), 1.0)


def decode_bytes(tensors: Mapping[str, int], method: str | None = None,
                 sparsity: Mapping | None = None, fixed: Mapping[str, int] | None = None) -> float:
    """Bytes of weights read per decoded token.

    tensors: name -> n_bytes of every tensor in the file. Dense (method None): every original
    per-layer tensor (attention q/k/v/o, FFN gate/up/down, biases, norms), the global tensors
    (output norm, ...) and the output head (format.head_weight); token_embd.weight is not counted
    when a separate output.weight exists (decoding reads one of its rows). Sparse (method chess,
    chess-ffn or cats): in a layer that has the CHESS copy,
    ffn_up counts n_bytes*(1-s_ffn), ffn_down is replaced by chess_wt_down*(1-s_ffn), and for chess
    attn_q by chess_wt_q*(1-s_q) and attn_output by chess_wt_o*(1-s_o); a fused gate+up ffn_up (no
    ffn_gate) counts its gate half densely; for chess, a file with a CHESS head reads its copy
    output.chess_wt*(1-s_head) when s_head > 0 (else the head itself, densely). sparsity: {"ffn", "q",
    "o", "head"} -> a fraction or a per-layer list of fractions (the head: one entry; NaN/None = that
    layer runs dense). fixed: bytes of a
    copy read whatever the sparsity (an x4 copy's affine pairs: 4 of its 20 bytes per 32 weights)."""
    from .format import HEAD_THR, HEAD_WT, SPARSE_READS, head_weight, is_chess_tensor
    if method is not None and method not in SPARSE_PARTS:
        raise ValueError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
    parts = SPARSE_PARTS[method] if method else ()
    head = head_weight(tensors)
    s_head = _part_sparsity(sparsity, "head", 0) if "head" in parts and HEAD_THR in tensors else 0.0
    total = 0.0
    for name, nb in tensors.items():
        m = _BLK.match(name)
        if m is None:
            if is_chess_tensor(name) or (name == "token_embd.weight" and name != head):
                continue  # the head's copy is counted in place of the head
            total += tensors[HEAD_WT] * (1.0 - s_head) if name == head and s_head > 0 else nb
            continue
        il, kind = int(m.group(1)), m.group(2)
        if kind.startswith("chess_"):
            continue  # counted in place of the original it replaces
        part, gate, copy = SPARSE_READS.get(kind, (None, None, None))
        if part in parts and f"blk.{il}.{gate}" in tensors:
            src = f"blk.{il}.{copy}" if f"blk.{il}.{copy}" in tensors else name  # the copy, or itself
            read, always = tensors[src], (fixed or {}).get(src, 0)
            if kind == "ffn_up.weight" and f"blk.{il}.ffn_gate.weight" not in tensors:
                always += read / 2  # fused gate+up (phi3, glm4): the gate's half is read densely
            total += always + (read - always) * (1.0 - _part_sparsity(sparsity, part, il))
        else:
            total += nb
    return total


def ideal_speedup(tensors: Mapping[str, int], method: str | None, sparsity: Mapping | None,
                  fixed: Mapping[str, int] | None = None) -> float:
    """Dense bytes per decoded token / sparse bytes at that sparsity (1.0 for method None)."""
    sparse = decode_bytes(tensors, method, sparsity, fixed)
    return decode_bytes(tensors) / sparse if sparse > 0 else float("inf")


def speedup_key(method: str, level: str, methods: Sequence[str]) -> str:
    """'<level>' for the default single method chess, else '<method>@<level>'."""
    return level if list(methods) == ["chess"] else f"{method}@{level}"


# --- arguments ------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="+", help="CHESS GGUF file(s) (python -m chess_gguf convert); several files "
                                            "(layouts of one model) are measured side by side")
    p.add_argument("--original", metavar="FILE", default=None,
                   help="the unconverted model: measured dense in the same rounds, every file is compared with it")
    p.add_argument("--memory", action="store_true",
                   help=f"also report each file's peak resident memory while decoding ({MEMORY_TOKENS} tokens at "
                        f"the first sparse level, a child {MEMORY_BIN} per file)")
    p.add_argument("--levels", type=arg(parse_levels), default=None,
                   help="comma-separated levels: off, default or stored levels (default: off and every stored "
                        "level; off is always measured, it is the baseline of the ratios)")
    p.add_argument("--methods", type=arg(parse_methods), default=["chess"],
                   help="comma-separated methods: chess, chess-ffn, cats (default chess)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--reps", type=positive_int, default=5, help="interleaved rounds; medians over them (default 5)")
    p.add_argument("--prefill", choices=PREFILLS, default="dense",
                   help="prompt processing of the sparse settings: dense (default) or masked like decoding")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--kernels", action="store_true",
                   help=f"run the native kernel benchmark ({KERNEL_BIN}) instead, for each level's kept "
                        "fraction and threads 1 and --threads")
    p.add_argument("--decode-tokens", type=positive_int, default=128, help="advanced: timed decode tokens (default 128)")
    p.add_argument("--prompt-tokens", type=positive_int, default=256, help="advanced: prompt tokens (default 256)")


# --- the file -------------------------------------------------------------------------------------

def read_file(path: str | os.PathLike, stock_ok: bool = False) -> dict:
    """Tensor sizes, stored levels, default level, layout and size of a CHESS file, validated as the
    loader does (format.read_chess: clear errors otherwise); with stock_ok a file without CHESS (the
    original, a baseline) is read too."""
    from gguf import GGMLQuantizationType as QT

    from . import format as fmt, gguf_io, x4
    r = gguf_io.read(path)  # missing/bad file: one line naming it
    tensors = {t.name: int(t.n_bytes) for t in r.tensors}
    size = os.path.getsize(path)
    if stock_ok and gguf_io.field_value(r, "chess.version") is None:
        return {"tensors": tensors, "levels": [], "default": None, "layout": None, "size": size}
    info = fmt.read_chess(path)
    if not info["tensors"]:
        raise ValueError(f"{path}: CHESS keys but no CHESS tensors: reconvert it with `python -m chess_gguf convert`")
    fixed = {t.name: x4.pair_bytes(int(t.n_bytes)) for t in r.tensors
             if t.tensor_type == QT.I8 and fmt.is_transposed_weight(t.name)}
    return {"tensors": tensors, "fixed": fixed, "levels": [f"{round(float(x), 6):g}" for x in info["levels"]],
            "default": f"{round(float(info['default_level']), 6):g}", "layout": info["layout"], "size": size}


def _resolve_levels(requested: Sequence[str] | None, info: dict) -> list[str]:
    """'off' first (always: it is the baseline), then the sparse levels; 'default' -> the file's."""
    req = list(requested) if requested else info["levels"]
    out = ["off"]
    for lv in req:
        lv = info["default"] if lv == "default" and info["default"] else lv
        if lv not in out:
            out.append(lv)
    return out


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- end-to-end benchmark -------------------------------------------------------------------------

def _text_tokens(model, n: int) -> list[int]:
    """BOS (when the model adds one) + real text from the evaluation split: n tokens."""
    from .data import default_eval_path
    text = default_eval_path().read_text(encoding="utf-8", errors="replace")
    chars = 8 * n
    while True:
        toks = model.tokenize(text[:chars], add_special=True)
        if len(toks) >= n or chars >= len(text):
            break
        chars *= 2
    if len(toks) < n:
        raise ValueError(f"{default_eval_path()}: only {len(toks)} tokens, {n} needed")
    return toks[:n]


def _sparsity_of(stats: dict) -> tuple[dict, dict]:
    """(overall, per-layer) realised sparsity {"ffn", "q", "o"} from Context.chess_stats();
    a part without counts ran dense: 0."""
    overall, per_layer = {}, {}
    for part, key in STATS_PART.items():
        s = stats[key]["sparsity"]
        overall[part] = 0.0 if s is None else float(s)
        per_layer[part] = [0.0 if (x is None or math.isnan(x)) else float(x) for x in stats[key]["per_layer"]]
    return overall, per_layer


def _mean(rows: Sequence[Sequence[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows, strict=True)]


def _configs(info: dict, levels: Sequence[str] | None, methods: Sequence[str]) -> list[tuple[str, str]]:
    """(method, level) settings of one file: dense `off` first, then every method at every sparse level."""
    if not info["levels"]:
        return [(DENSE, "off")]
    return [(DENSE, "off")] + [(m, lv) for m in methods for lv in _resolve_levels(levels, info) if lv != "off"]


def tool_path(name: str) -> Path:
    """A native program beside the patched libllama (runtime.lib_dir)."""
    from .runtime import lib_dir
    return lib_dir() / name


# Linux keeps a process's peak RSS across fork and exec, so a child forked from this (large) process
# would report at least our own peak. A bare interpreter (a few MB) forks the program instead and
# reports the grandchild's rusage.
_RSS_PROBE = ("import os, sys\n"
              "out = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]\n"
              "pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, file_actions=out)\n"
              "_, status, ru = os.wait4(pid, 0)\n"
              "print(ru.ru_maxrss, os.waitstatus_to_exitcode(status))\n")


def peak_rss(path: str | os.PathLike, level: str) -> int:
    """Peak resident memory (bytes) of the patched llama-simple loading PATH and generating
    MEMORY_TOKENS tokens at LEVEL (`off` = dense): the whole process, weights as the runtime maps
    them, KV cache and compute buffers included."""
    from .runtime import RuntimeError_
    exe = tool_path(MEMORY_BIN)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise RuntimeError_(f"{exe}: not found (needed for peak memory): build it with `make`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHESS_")}
    env["CHESS_LEVEL"] = level
    cmd = [sys.executable, "-S", "-c", _RSS_PROBE, str(exe), "-m", str(path), "-n", str(MEMORY_TOKENS), MEMORY_PROMPT]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    try:
        kib, code = (int(x) for x in p.stdout.split()[-2:])
    except ValueError:
        kib, code = 0, p.returncode or 1
    if code != 0:
        why = (p.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError_(f"{exe} -m {path}: failed (exit {code}): {why}")
    return kib * 1024  # Linux reports kilobytes


def run(paths: str | os.PathLike | Sequence[str | os.PathLike], *, original: str | os.PathLike | None = None,
        levels: Sequence[str] | None = None, methods: Sequence[str] = ("chess",), threads: int | None = None,
        reps: int = 5, decode_tokens: int = 128, prompt_tokens: int = 256, prefill: str = "dense",
        memory: bool = False, progress=_progress) -> dict:
    """The end-to-end benchmark; returns the JSON object `bench --json` prints.

    One file without --original: that file's settings against its own `off`. Several files (the
    layouts of one model) and/or ORIGINAL (the unconverted model): every file in one process, all
    settings of all files interleaved round by round, and each file also against the original's
    dense medians; with memory, each file's size and peak resident memory (peak_rss) too."""
    from .runtime import Context, Model

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    entries = [(str(p), read_file(p)) for p in paths]
    if original is not None:
        entries.insert(0, (str(original), read_file(original, stock_ok=True)))
    methods = list(methods)
    threads = threads or os.cpu_count() or 1
    configs = [(fi, m, lv) for fi, (_, info) in enumerate(entries) for m, lv in _configs(info, levels, methods)]
    runs = {c: {k: [] for k in ("decode", "prefill", "layers", "counted", *SPARSE_PARTS["chess"])} for c in configs}
    n_tok = max(PREFIX_TOKENS + decode_tokens, prompt_tokens)
    need = max(512, PREFIX_TOKENS + decode_tokens, prompt_tokens)
    n_ctx = -(-need // 256) * 256

    with contextlib.ExitStack() as stack:
        ctxs, toks = [], None
        for path, _ in entries:
            model = Model(path)
            stack.callback(model.close)
            t = _text_tokens(model, n_tok)
            if toks is not None and t != toks:
                raise ValueError(f"{path}: tokenizes the benchmark text differently from {entries[0][0]}: "
                                 "compare layouts of one model only")
            toks = t
            ctxs.append(stack.enter_context(Context(model, n_ctx=n_ctx, n_batch=max(256, prompt_tokens),
                                                    n_threads=threads)))
        prefix, prompt = toks[:PREFIX_TOKENS], toks[:prompt_tokens]
        dec = toks[PREFIX_TOKENS:PREFIX_TOKENS + decode_tokens]

        def select(fi: int, method: str, level: str) -> None:
            if entries[fi][1]["levels"]:  # a stock original has no CHESS settings: it is always dense
                ctxs[fi].chess_set(None if method == DENSE else method, level, prefill)

        def decode_run(ctx) -> float:
            ctx.clear()
            ctx.decode(prefix, logits="compute")
            ctx.chess_stats_reset()
            t0 = time.perf_counter()
            for t in dec:
                ctx.decode([t], logits="compute")  # output row computed, nothing copied back
            return len(dec) / (time.perf_counter() - t0)

        def prefill_run(ctx) -> float:
            ctx.clear()
            t0 = time.perf_counter()
            ctx.decode(prompt, logits="last")
            return len(prompt) / (time.perf_counter() - t0)

        # Every setting is validated (the runtime's message on a level the file lacks) and warmed
        # up before anything is timed.
        for fi, method, level in configs:
            select(fi, method, level)
            ctxs[fi].clear()
            ctxs[fi].decode(prefix, logits="compute")
            for t in dec[:4]:
                ctxs[fi].decode([t], logits="compute")
        for rep in range(reps):
            # ABBA: every other round runs the settings in reverse, so no setting always follows another
            for fi, method, level in (configs if rep % 2 == 0 else configs[::-1]):
                ctx = ctxs[fi]
                select(fi, method, level)
                r = runs[(fi, method, level)]
                r["decode"].append(decode_run(ctx))
                st = ctx.chess_stats()
                r["counted"].append(st["tokens"])
                overall, per_layer = _sparsity_of(st)
                for part in SPARSE_PARTS["chess"]:
                    r[part].append(overall[part])
                r["layers"].append(per_layer)
                r["prefill"].append(prefill_run(ctx))
                who = f"{Path(entries[fi][0]).name}: " if len(entries) > 1 else ""
                progress(f"round {rep + 1}/{reps}: {who}{method} {level}: decode {r['decode'][-1]:.1f} tok/s, "
                         f"prompt {r['prefill'][-1]:.1f} tok/s")

    common = {"threads": threads, "reps": reps, "decode_tokens": len(dec), "prompt_prefix_tokens": len(prefix),
              "prompt_tokens": len(prompt), "prefill": prefill}
    base = None
    if original is not None:
        path, info = entries[0]
        r = runs[(0, DENSE, "off")]
        base = {"file": path, "size_bytes": info["size"], "decode_tps": statistics.median(r["decode"]),
                "prefill_tps": statistics.median(r["prefill"]), "decode_tps_runs": r["decode"],
                "prefill_tps_runs": r["prefill"], "weight_bytes_dense": decode_bytes(info["tensors"])}
        if memory:
            progress(f"peak memory: {path} (dense)")
            base["peak_rss_bytes"] = peak_rss(path, "off")
    files = []
    for fi, (path, info) in enumerate(entries):
        if original is not None and fi == 0:
            continue
        mine = [(m, lv) for f, m, lv in configs if f == fi]
        f = _summarise(path, info, {(m, lv): runs[(fi, m, lv)] for m, lv in mine}, methods, base)
        if memory:
            level = next((lv for m, lv in mine if m != DENSE), "off")
            progress(f"peak memory: {path} (level {level})")
            f["peak_rss_level"] = level
            f["peak_rss_bytes"] = peak_rss(path, level)
            if base is not None:
                f["peak_rss_vs_original"] = f["peak_rss_bytes"] / base["peak_rss_bytes"]
        files.append(f)
    if len(files) == 1 and base is None:
        return {**files[0], **common}  # the single-file shape
    return {**common, "original": base, "files": files}


def _summarise(path: str, info: dict, runs: dict, methods: Sequence[str], base: dict | None) -> dict:
    """Medians and ratios of one file's settings; ratios to its own `off`, and to the original's
    dense medians (`*_vs_original`) when there is one."""
    results, dec_sp, pre_sp, ideal = [], {}, {}, {}
    own = runs[(DENSE, "off")]
    own_dec, own_pre = statistics.median(own["decode"]), statistics.median(own["prefill"])
    for (method, level), r in runs.items():
        sparse_method = None if method == DENSE else method
        per_layer = {part: _mean([lay[part] for lay in r["layers"]]) for part in SPARSE_PARTS["chess"]}
        d, p = statistics.median(r["decode"]), statistics.median(r["prefill"])
        res = {"level": level if level == "off" else float(level), "method": method,
               "decode_tps": d, "prefill_tps": p,
               "decode_tps_runs": r["decode"], "prefill_tps_runs": r["prefill"],
               "realised_sparsity": {part: sum(r[part]) / len(r[part]) for part in SPARSE_PARTS["chess"]},
               "realised_sparsity_per_layer": per_layer,
               "sparse_tokens": max(r["counted"]),
               "ideal_speedup": ideal_speedup(info["tensors"], sparse_method, per_layer, info.get("fixed")),
               "weight_bytes_per_token": decode_bytes(info["tensors"], sparse_method, per_layer, info.get("fixed")),
               "decode_speedup": d / own_dec, "prefill_speedup": p / own_pre}
        if base is not None:
            res["decode_vs_original"] = d / base["decode_tps"]
            res["prefill_vs_original"] = p / base["prefill_tps"]
        results.append(res)
        if method != DENSE:
            k = speedup_key(method, level, methods)
            dec_sp[k], pre_sp[k], ideal[k] = res["decode_speedup"], res["prefill_speedup"], res["ideal_speedup"]
    out = {"file": path, "layout": info["layout"], "size_bytes": info["size"],
           "weight_bytes_dense": decode_bytes(info["tensors"]),
           "results": results, "decode_speedup": dec_sp, "prefill_speedup": pre_sp, "ideal_speedup": ideal}
    if base is not None:
        out["size_vs_original"] = info["size"] / base["size_bytes"]
    return out


def print_table(res: dict, out=None) -> None:
    out = out or sys.stdout

    def w(line: str) -> None:
        print(line, file=out)

    base = res.get("original")
    files = res.get("files", [res])
    w(f"{res['threads']} threads, median of {res['reps']} interleaved rounds; decode: {res['decode_tokens']} tokens "
      f"after a {res['prompt_prefix_tokens']}-token prompt; prompt: {res['prompt_tokens']} tokens "
      f"({res['prefill']} prefill for sparse levels)")
    mb = 1024 * 1024
    if base is not None:
        mem = f", peak memory {base['peak_rss_bytes'] / mb:.1f} MiB" if "peak_rss_bytes" in base else ""
        w(f"original {base['file']}: {base['size_bytes'] / mb:.1f} MiB{mem}; dense decode {base['decode_tps']:.1f} "
          f"tok/s, prompt {base['prefill_tps']:.1f} tok/s")
    vs = base is not None
    for f in files:
        line = f"{f['file']} ({f['layout']} layout): {f['size_bytes'] / mb:.1f} MiB"
        if vs:
            line += f" ({f['size_vs_original']:.3f}x original)"
        if "peak_rss_bytes" in f:
            line += f", peak memory {f['peak_rss_bytes'] / mb:.1f} MiB at level {f['peak_rss_level']}"
            if vs:
                line += f" ({f['peak_rss_vs_original']:.3f}x original)"
        w(line)
        w(f"  {'method':<10} {'level':>5}  {'decode t/s':>10} {'speedup':>8} {'ideal':>6} {'MB/tok':>7}  {'prompt t/s':>10} "
          f"{'speedup':>8}  {'sparsity ffn':>12} {'q':>5} {'o':>5} {'head':>5}" + ("  vs original: decode  prompt" if vs else ""))
        for r in f["results"]:
            s = r["realised_sparsity"]
            lv = r["level"] if r["level"] == "off" else f"{r['level']:g}"
            line = (f"  {r['method']:<10} {lv:>5}  {r['decode_tps']:>10.1f} {r['decode_speedup']:>7.2f}x "
                    f"{r['ideal_speedup']:>5.2f}x {r['weight_bytes_per_token'] / 1e6:>7.1f}  {r['prefill_tps']:>10.1f} "
                    f"{r['prefill_speedup']:>7.2f}x  "
                    f"{s['ffn']:>12.3f} {s['q']:>5.3f} {s['o']:>5.3f} {s['head']:>5.3f}")
            if vs:
                line += f"  {r['decode_vs_original']:>19.2f}x {r['prefill_vs_original']:>6.2f}x"
            w(line)
    w("speedup: median tok/s / median tok/s of the same file's off (same process). ideal: weight bytes read per "
      "decoded token, dense / sparse at the realised sparsity (MB/tok: the sparse bytes, 1e6 bytes)."
      + (" vs original: / the original's dense medians."
                                                                   if vs else ""))


# --- native kernel benchmark ----------------------------------------------------------------------

def _parse_kernel_output(stdout: str, exe: Path) -> dict:
    text = stdout.strip()
    candidates = [text] + [ln for ln in reversed(text.splitlines()) if ln.lstrip().startswith("{")]
    for c in candidates:
        try:
            obj = json.loads(c)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("kernels"), list):
            return obj
    raise ValueError(f"{exe}: output is not the expected JSON object: {text[:200]!r}")


def run_kernels(path: str | os.PathLike, *, levels: Sequence[str] | None = None, threads: int | None = None,
                reps: int = 5, progress=_progress) -> dict:
    from .runtime import RuntimeError_
    exe = tool_path(KERNEL_BIN)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise RuntimeError_(f"{exe}: kernel benchmark not found: build it with `make` (target {KERNEL_BIN})")
    info = read_file(path)
    sparse = [lv for lv in _resolve_levels(levels, info) if lv != "off"]
    for lv in sparse:
        if not any(abs(float(lv) - float(s)) < 1e-4 for s in info["levels"]):
            raise ValueError(f"{path}: level {lv} is not stored in this file (stored: {', '.join(info['levels'])})")
    if not sparse:
        raise ValueError("--kernels: give at least one sparse level")
    threads = threads or os.cpu_count() or 1
    out = []
    for lv in sparse:
        keep = f"{round(1.0 - float(lv), 6):g}"
        for nt in sorted({1, threads}):
            cmd = [str(exe), str(path), "--keep", keep, "--threads", str(nt), "--reps", str(reps)]
            progress(f"level {lv} (keep {keep}), {nt} thread(s): {' '.join(cmd)}")
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except OSError as e:
                raise RuntimeError_(f"{exe}: cannot run it: {e}") from None
            if p.returncode != 0:
                why = (p.stderr.strip().splitlines() or ["no message"])[-1]
                raise RuntimeError_(f"{exe}: failed (exit {p.returncode}): {why}")
            obj = _parse_kernel_output(p.stdout, exe)
            obj["level"] = float(lv)
            out.append(obj)
    return {"file": str(path), "reps": reps, "kernels": out}


def print_kernels(res: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"{res['file']}: native kernels ({KERNEL_BIN}), {res['reps']} reps; dense = ggml's mul_mat as the original "
          f"model runs it; bytes = dense weight bytes / bytes the sparse kernel reads", file=out)
    print(f"{'level':>5} {'keep':>5} {'thr':>3} {'layer':>5}  {'kernel':<9} {'type':<5} {'copy':<5} {'in x out':>11} "
          f"{'route':<12} {'dense us':>9} {'sparse us':>9} {'speedup':>8} {'bytes':>6}", file=out)
    for run_ in res["kernels"]:
        for k in run_["kernels"]:
            shape = f"{k.get('in', '?')}x{k.get('out', '?')}"
            keep = float(run_.get("keep", 1 - run_["level"]))
            ratio = f"{float(k['byte_ratio']):.2f}x" if "byte_ratio" in k else "?"
            print(f"{run_['level']:>5g} {keep:>5.2f} {run_.get('threads', '?'):>3} {run_.get('layer', '?'):>5}  "
                  f"{k.get('name', '?'):<9} {k.get('type', '?')!s:<5} {k.get('sparse_type', '?')!s:<5} {shape:>11} "
                  f"{k.get('route', '?')!s:<12} {float(k['dense_us']):>9.1f} {float(k['sparse_us']):>9.1f} "
                  f"{float(k['speedup']):>7.2f}x {ratio:>6}", file=out)


# --- command ----------------------------------------------------------------------------------------

def command(args: argparse.Namespace) -> int:
    if args.kernels:
        if len(args.model) > 1 or args.original or args.memory:
            raise ValueError("--kernels takes one CHESS file (no --original, no --memory)")
        res = run_kernels(args.model[0], levels=args.levels, threads=args.threads, reps=args.reps)
        if args.json:
            print(json.dumps(res))
        else:
            print_kernels(res)
        return 0
    res = run(args.model, original=args.original, levels=args.levels, methods=args.methods, threads=args.threads,
              reps=args.reps, decode_tokens=args.decode_tokens, prompt_tokens=args.prompt_tokens,
              prefill=args.prefill, memory=args.memory)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0
