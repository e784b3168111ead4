"""`convert`: calibrate -> thresholds -> transposed weights -> CHESS GGUF (docs/format.md)."""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

from . import __version__
from . import format as fmt, gguf_io, x4
from .errors import RuntimeError_
from .calibrate import SUPPORTED, SUPPORTED_ARCHS, CalibStats, activation_of, calibrate
from .options import LAYOUTS
from .runtime import Context, Model, quantize_rows
from .windows import bos_replacing, bos_tokens, window_nll
from .writer import patch_string, sigterm_as_interrupt, write_with_extras
from .thresholds import (RULES, channel_stat, check_levels, column_norms, error_curve, greedy_budget,
                         hist_chess_thresholds, hist_fraction_below, hist_scalar_thresholds, rule_weights)

# Transposed copies keep the original's type when its block fits the new row length (the row
# length becomes the matrix's OUTPUT dimension). K-quants need rows of 256, so e.g. Qwen's
# n_embd = 896 cannot hold them: fall back to the legacy type of at least the same bits.
FALLBACK = {
    QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q4_1, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
    QT.IQ4_XS: QT.IQ4_NL, QT.IQ2_XXS: QT.Q4_0, QT.IQ2_XS: QT.Q4_0, QT.IQ2_S: QT.Q4_0,
    QT.IQ3_XXS: QT.Q4_0, QT.IQ3_S: QT.Q4_0, QT.IQ1_S: QT.Q4_0, QT.IQ1_M: QT.Q4_0, QT.TQ1_0: QT.Q4_0,
    QT.TQ2_0: QT.Q4_0,
}
# The compact layout replaces the originals, so it avoids growing the file: Q6_K gets Q5_1 (6.0
# bits/weight, below Q6_K's 6.56) instead of Q8_0 (8.5), which pays for Q4_K -> Q4_1 (+0.5 bit).
COMPACT_FALLBACK = {**FALLBACK, QT.Q6_K: QT.Q5_1}
# Dual layout: Q5_K and Q6_K copies are Q8_0 even where their own block fits. The sparse kernel
# decodes those two to float (0.2-0.7x of ggml's dense speed on the same matrix), Q8_0 runs integer
# dots (1.0-1.5x with every row kept, 1.7-2.9x at half): faster despite 30-55% more bytes, and a
# second rounding at 8 bits instead of 5-6 (docs/kernels.md, "Copies of Q5_K and Q6_K").
DUAL_FIRST = {QT.Q5_K: QT.Q8_0, QT.Q6_K: QT.Q8_0}
QUANTIZABLE = {QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K,
               QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS}


def transposed_type(orig: QT, row_len: int, override: Optional[QT] = None, layout: str = "dual") -> QT:
    """The rule for a transposed copy's type (see module comment); override wins when it fits."""
    from gguf.constants import GGML_QUANT_SIZES
    fits = lambda t: row_len % GGML_QUANT_SIZES[t][0] == 0  # noqa: E731
    fallback = (COMPACT_FALLBACK if layout == "compact" else FALLBACK).get(orig, QT.Q8_0)
    first = [DUAL_FIRST[orig]] if layout == "dual" and orig in DUAL_FIRST else []
    for t in ([override] if override is not None else []) + first + [orig, fallback, QT.Q8_0, QT.F16]:
        if t in QUANTIZABLE and fits(t):
            return t
    return QT.F32


# The defaults come from the measured frontier (docs/results.md, "The output head in the runtime"):
# the head at 0.3 costs little (KLD 0.03 SmolLM2 / 0.02 Qwen alone) for 9-11% of the bytes, and
# level 0.4 + head 0.3 reads 7-8% fewer bytes than level 0.5 without it at 37-42% less KLD, on both
# dev models, decoding as fast or faster. Without the head, the paper's level 0.5 stays the default.
HEAD_DEFAULT = 0.3
DEFAULT_LEVELS = {True: (0.4, 0.5), False: (0.5,)}  # preferred default level, with / without the head


def default_level_for(levels: Sequence[float], head: bool) -> float:
    """The first preferred level among the stored ones (DEFAULT_LEVELS), else an error asking for one."""
    for lv in DEFAULT_LEVELS[head]:
        if lv in levels:
            return lv
    raise ValueError(f"--levels {list(levels)}: give --default-level (one of them; the default is "
                     f"{' or '.join(map(str, DEFAULT_LEVELS[head]))} when stored)")


@dataclass
class Options:
    levels: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7)
    default_level: Optional[float] = None  # None: default_level_for(levels, head)
    calib_files: Sequence[str] = ()
    calib_tokens: int = 16384
    ctx: int = 512
    threads: Optional[int] = None
    stat: str = "mean-abs"
    rule: str = "auto"    # per-channel FFN threshold rule (thresholds.RULES, or auto); recorded in chess.rule
    budget: bool = False  # per-layer FFN sparsity budget (same mean = the level); recorded in chess.budget
    budget_rows: int = 512
    budget_span: float = 0.2
    attention: bool = True
    force: bool = False
    wt_type: Optional[str] = None  # None/"x4": x4 where it fits; "requant": the type rule; or a ggml type
    layout: str = "dual"
    # output head sparsity per level (one value: every level); () = off (dense head); None = HEAD_DEFAULT
    # in the dual layout, off in the compact one (whose file keeps the input's size)
    head: Optional[Sequence[float]] = None
    progress: bool = True
    checkpoint_every: float = 300.0  # seconds between saves of the statistics (OUT.calib-partial)


def default_output(inp: Path) -> Path:
    name = inp.name[:-5] if inp.name.endswith(".gguf") else inp.name
    return inp.with_name(name + ".chess.gguf")


def checkpoint_path(out: Path) -> Path:
    """Where convert keeps the calibration statistics until the output is written (a rerun resumes)."""
    return out.with_name(out.name + ".calib-partial")


def check_paths(inp: Path, out: Path, force: bool) -> None:
    if out.resolve() == inp.resolve():
        raise ValueError(f"{out}: refusing to overwrite the input file")
    if not out.parent.is_dir():
        raise ValueError(f"{out}: output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"{out}: output folder {out.parent} is not writable")
    if out.exists() and not force:
        raise ValueError(f"{out}: already exists (use --force to overwrite)")


def load_calib_text(files: Sequence[str]) -> tuple[str, str]:
    if not files:
        from .data import default_calib_path
        files = [str(default_calib_path())]
    parts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: calibration file not found")
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
    text = "\n\n".join(parts)
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def compute_thresholds(st: CalibStats, levels: Sequence[float], stat: str, rule: str = "chess",
                       col_norms: Optional[Sequence[np.ndarray]] = None,
                       layer_levels: Optional[np.ndarray] = None) -> list[dict]:
    """Per layer: per-channel tau [n_levels, n_ff] of `rule` (thresholds.RULES; the paper's CHESS by
    default), CATS [n_levels], attention q/o [n_levels], m, and the rule's channel weights w.
    layer_levels [n_layer, n_levels] (a per-layer budget) replaces the level for the per-channel taus."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} (expected one of {', '.join(RULES)})")
    out = []
    for il, L in enumerate(st.layers):
        m = channel_stat(L.sum_abs_u, L.sum_sq_u, st.n_tokens, stat)
        w = rule_weights(rule, m, None if col_norms is None else col_norms[il])
        lv_l = levels if layer_levels is None else layer_levels[il]
        tau = (hist_chess_thresholds(L.hist_a, w, levels) if layer_levels is None else
               np.concatenate([hist_chess_thresholds(L.hist_a, w, [float(s)]) for s in lv_l]))
        out.append({
            "m": m, "w": w, "levels": np.asarray(lv_l, dtype=np.float64),
            "ffn_tau": tau,
            "ffn_cats": hist_scalar_thresholds(L.hist_cats, levels),
            "attn_q": hist_scalar_thresholds(L.hist_q, levels),
            "attn_o": hist_scalar_thresholds(L.hist_o, levels),
        })
    return out


BUDGET_GRID = np.round(np.arange(0.05, 0.951, 0.025), 4)


def layer_budget(st: CalibStats, levels: Sequence[float], stat: str, rule: str, col_norms, w_down,
                 span: float = 0.2) -> np.ndarray:
    """Per-layer FFN sparsity [n_layer, n_levels] whose mean over layers is each level (layers have equal
    work), chosen greedily (thresholds.greedy_budget) to minimise the summed FFN output error relative
    to the residual stream: sum_rows ||W_down (dropped * act(g) * u)||^2 / sum_rows ||ffn_inp||^2 on the
    calibration rows kept by calibrate(keep_signed=True); each layer stays within level +- span."""
    lo_all, hi_all = min(levels) - span - 1e-9, max(levels) + span + 1e-9
    grid = BUDGET_GRID[(BUDGET_GRID >= lo_all) & (BUDGET_GRID <= hi_all)]  # only where a layer may go
    cost = np.zeros((len(st.layers), len(grid)))
    for il, L in enumerate(st.layers):
        if L.ga is None or L.u is None or L.sum_r2 <= 0:
            raise ValueError("layer_budget: calibration kept no signed rows (calibrate(keep_signed=True))")
        m = channel_stat(L.sum_abs_u, L.sum_sq_u, st.n_tokens, stat)
        w = rule_weights(rule, m, None if col_norms is None else col_norms[il])
        cost[il] = error_curve(L.ga, L.u, w, w_down(il), grid) / (len(L.ga) * L.sum_r2 / st.n_tokens)
    out = np.stack([greedy_budget(cost, grid, lv, lo=max(grid[0], lv - span),
                                  hi=min(grid[-1], lv + span)) for lv in levels], axis=1)
    return out


# --rule auto: the candidates, and what decides between them (docs/results.md, "Beyond the paper")
AUTO_RULES = ("chess", "wchess")
AUTO_LEVELS = (0.5, 0.7)   # the levels scored (those stored; else the default level)
AUTO_TOKENS = 2048         # held-out calibration tokens: windows of --ctx, second halves scored


def check_supported(reader, path: Path) -> str:
    """The file's architecture if CHESS covers it: a gated FFN that llama.cpp builds with build_ffn
    and no biases (the sparse route replaces exactly that), no mixture of experts. Else one error
    naming the file, the architecture and what is supported."""
    arch = gguf_io.field_value(reader, "general.architecture")
    activation_of(arch, path)
    names = [t.name for t in reader.tensors]
    if (gguf_io.field_value(reader, f"{arch}.expert_count") or 0) > 0 or any("_exps." in n for n in names):
        raise ValueError(f"{path}: {arch} with mixture-of-experts FFNs is not supported ({SUPPORTED}, without experts)")
    biased = sorted({n.split(".")[2] for n in names if re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)\.bias", n)})
    if biased:
        raise ValueError(f"{path}: {arch} with FFN biases ({', '.join(biased)}) is not supported ({SUPPORTED}, "
                         "without FFN biases)")
    return arch


def fused_qkv_layers(reader, n_layer: int) -> list[int]:
    """Layers that keep W_q, W_k, W_v in one attn_qkv tensor (phi3 files): no input-sparse W_q there."""
    names = {t.name for t in reader.tensors}
    return [il for il in range(n_layer)
            if f"blk.{il}.attn_qkv.weight" in names and f"blk.{il}.attn_q.weight" not in names]


def threshold_tensors(thr: list[dict], attention: bool, no_q: Sequence[int] = ()) -> list[tuple]:
    out = []
    for il, t in enumerate(thr):
        out.append((f"blk.{il}.chess_ffn_tau", np.ascontiguousarray(t["ffn_tau"], dtype=np.float32), None))
        out.append((f"blk.{il}.chess_ffn_cats", t["ffn_cats"].astype(np.float32), None))
        if attention:
            if il not in no_q:
                out.append((f"blk.{il}.chess_thr_q", t["attn_q"].astype(np.float32), None))
            out.append((f"blk.{il}.chess_thr_o", t["attn_o"].astype(np.float32), None))
    return out


def held_out_nll(path: Path, windows: list[list[int]], levels: Sequence[float], threads: Optional[int],
                 bar=None) -> float:
    """Mean NLL per scored token of `windows` decoded with CHESS-FFN (masks on every token) at each
    level of a converted file, averaged over the levels. bar: a progress bar advanced by each window."""
    model = Model(path)
    try:
        with Context(model, n_ctx=len(windows[0]), n_batch=len(windows[0]), n_threads=threads) as c:
            per_level = []
            for lv in levels:
                c.chess_set("chess-ffn", f"{lv:g}", "masked")
                nll = []
                for w in windows:
                    nll.append(window_nll(c, w))
                    if bar is not None:
                        bar.update(len(w))
                per_level.append(sum(a for a, _ in nll) / sum(b for _, b in nll))
    finally:
        model.close()
    return float(np.mean(per_level))


def _write_tau(path: Path, thr: list[dict]) -> None:
    """Rewrite a written file's chess_ffn_tau tensors in place."""
    from gguf import GGUFReader
    rd = GGUFReader(path, "r+")
    taus = {t.name: t for t in rd.tensors if t.name.endswith(".chess_ffn_tau")}
    for il, t in enumerate(thr):
        d = taus[f"blk.{il}.chess_ffn_tau"].data
        d[...] = np.asarray(t["ffn_tau"], dtype=np.float32).reshape(d.shape)
    rd.data.flush()


def choose_rule(path: Path, cands: dict[str, list[dict]], windows: list[list[int]], levels: Sequence[float],
                threads: Optional[int], bar=None) -> dict[str, float]:
    """Held-out NLL of each candidate rule's thresholds, through the runtime, on the written output
    (the candidates differ only in chess_ffn_tau, rewritten in place between runs); the file is left
    with the best candidate's thresholds."""
    scores = {}
    for rule, thr in cands.items():
        _write_tau(path, thr)
        scores[rule] = held_out_nll(path, windows, levels, threads, bar)
    best = min(scores, key=scores.get)
    if best != rule:
        _write_tau(path, cands[best])
    return scores


def calib_sparsity(st: CalibStats, thr: list[dict], levels: Sequence[float]) -> dict[str, np.ndarray]:
    """Realised sparsity per [level, layer] on the calibration text (from the histograms), per part."""
    res = {k: np.zeros((len(levels), len(thr))) for k in ("chess", "cats", "attn_q", "attn_o", "target")}
    for il, (L, t) in enumerate(zip(st.layers, thr)):
        for k in range(len(levels)):
            res["chess"][k, il] = hist_fraction_below(L.hist_a, t["ffn_tau"][k])
            res["target"][k, il] = t["levels"][k] if "levels" in t else levels[k]
            res["cats"][k, il] = hist_fraction_below(L.hist_cats, t["ffn_cats"][k])
            res["attn_q"][k, il] = hist_fraction_below(L.hist_q, t["attn_q"][k])
            res["attn_o"][k, il] = hist_fraction_below(L.hist_o, t["attn_o"][k])
    return res


def transposed_tensors(reader, n_layer: int, wt_type: Optional[QT], progress: bool, layout: str = "dual",
                       exact: bool = False, no_q: Sequence[int] = ()) -> list[tuple]:
    """Transposed copies of W_down, W_q, W_o for every layer: requantized, or with `exact` the x4
    layout (I8 rows, chess_gguf/x4.py) where the original is 4-bit."""
    by_name = {t.name: t for t in reader.tensors}
    jobs = []
    for il in range(n_layer):
        for dst, orig in fmt.TRANSPOSED_OF.items():
            name = f"blk.{il}.{orig}"
            if dst == "chess_wt_q" and il in no_q:
                continue  # W_q inside attn_qkv: that layer's W_q stays dense
            if name not in by_name:
                raise ValueError(f"{reader.data.filename}: tensor {name} missing")
            jobs.append((name, f"blk.{il}.{dst}"))
    out = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="mat", desc="transposing", dynamic_ncols=True)
    for name, dst in jobs:
        t = by_name[name]
        n_in, n_out = int(t.shape[0]), int(t.shape[1])
        if exact and x4.fits(QT(int(t.tensor_type)), n_out, n_in):
            out.append((dst, x4.from_raw(t.data, QT(int(t.tensor_type)), n_out, n_in), QT.I8))
            if bar:
                bar.update(1)
            continue
        w = fmt.tensor_f32(reader, name)           # [n_out, n_in]
        wt = np.ascontiguousarray(w.T)             # [n_in, n_out]: one row per input channel
        qt = transposed_type(QT(int(t.tensor_type)), wt.shape[1], wt_type, layout)
        if qt == QT.F32:
            out.append((dst, wt, None))
        elif qt == QT.F16:
            out.append((dst, wt.astype(np.float16), None))
        else:
            data = np.frombuffer(quantize_rows(wt, int(qt)), dtype=np.uint8).reshape(wt.shape[0], -1)
            out.append((dst, data, qt))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return out


def head_sparsities(head: Optional[Sequence[float]], levels: Sequence[float], layout: str) -> Optional[list[float]]:
    """--head: one sparsity per level (a single value applies to every level), each in [0, 1); None
    when the head stays dense."""
    if head is None:
        head = () if layout == "compact" else (HEAD_DEFAULT,)
    if not head:
        return None
    hs = [float(x) for x in head]
    if len(hs) == 1:
        hs = hs * len(levels)
    if len(hs) != len(levels):
        raise ValueError(f"--head: {len(hs)} sparsities for {len(levels)} levels (give one, or one per level)")
    if not all(0.0 <= x < 1.0 for x in hs):
        raise ValueError(f"--head: sparsities must be in [0, 1), got {[float(x) for x in head]}")
    return hs if any(hs) else None


def head_thresholds(hist_head: np.ndarray, hs: Sequence[float], path) -> np.ndarray:
    """One threshold on |h| per level (0 where the sparsity is 0: the head runs dense at that level)."""
    if not hist_head.any():
        raise RuntimeError_(f"{path}: calibration saw no result_norm node (the head's input): --head needs it")
    return np.array([hist_scalar_thresholds(hist_head, [s])[0] if s > 0 else 0.0 for s in hs], dtype=np.float32)


def head_copy(reader) -> tuple:
    """The head's transposed copy [n_embd rows of n_vocab] (format.head_weight), in Q8_0 (integer dots in the in kernel; a second rounding of a Q8_0 head
    costs a KLD of about 0.0007 against dense, docs/results.md) or F16 where n_vocab is not a multiple of 32."""
    name = fmt.head_weight({t.name for t in reader.tensors})
    wt = np.ascontiguousarray(fmt.tensor_f32(reader, name).T)  # [n_embd, n_vocab]
    if wt.shape[1] % 32:
        return fmt.HEAD_WT, wt.astype(np.float16), None
    data = np.frombuffer(quantize_rows(wt, int(QT.Q8_0)), dtype=np.uint8).reshape(wt.shape[0], -1)
    return fmt.HEAD_WT, data, QT.Q8_0


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: the histograms are many
    arrays of a few MB, below its mmap threshold). A no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def convert(inp: str, out: Optional[str], opt: Options) -> dict:
    t0 = time.perf_counter()
    inp_p = Path(inp)
    reader = gguf_io.read(inp_p)
    out_p = Path(out) if out else default_output(inp_p)
    levels = [float(x) for x in check_levels(opt.levels)]
    hs = head_sparsities(opt.head, levels, opt.layout)
    if opt.default_level is None:
        opt = dataclasses.replace(opt, default_level=default_level_for(levels, hs is not None))
    if opt.default_level not in levels:
        raise ValueError(f"--default-level {opt.default_level} is not one of --levels {levels}")
    if opt.stat not in ("mean-abs", "rms"):
        raise ValueError(f"--stat {opt.stat!r}: expected mean-abs or rms")
    if opt.rule not in RULES + ("auto",):
        raise ValueError(f"--rule {opt.rule!r}: expected one of {', '.join(RULES + ('auto',))}")
    if opt.layout not in LAYOUTS:
        raise ValueError(f"--layout {opt.layout!r}: expected one of {', '.join(LAYOUTS)}")
    if opt.layout == "compact" and not opt.attention:
        raise ValueError("--layout compact needs the attention part (it replaces W_q and W_o too): drop --no-attention")
    if gguf_io.field_value(reader, "chess.version") is not None and not opt.force:
        raise ValueError(f"{inp_p}: already a CHESS file (use --force to convert it again)")
    check_paths(inp_p, out_p, opt.force)
    arch = check_supported(reader, inp_p)
    wt_type = None  # default x4: exact copies of 4-bit originals, the rule for the rest
    if opt.wt_type and opt.wt_type not in ("x4", "requant"):
        try:
            wt_type = QT[opt.wt_type.upper()]
        except KeyError:
            raise ValueError(f"--wt-type {opt.wt_type!r}: unknown ggml type") from None

    text, text_sha = load_calib_text(opt.calib_files)
    model = Model(inp_p)
    act_kind = SUPPORTED_ARCHS[arch]  # arch checked above, from the file's metadata
    all_tokens = model.tokenize(text, add_special=False)
    tokens = all_tokens[: opt.calib_tokens]
    # --rule auto scores the rules on the calibration text's continuation, never on the tokens the
    # thresholds came from: windows of --ctx, the first token replaced by BOS as llama-perplexity does
    held = all_tokens[opt.calib_tokens: opt.calib_tokens + AUTO_TOKENS]
    windows = bos_replacing(held, opt.ctx, bos_tokens(model))
    if len(tokens) < opt.calib_tokens:
        print(f"note: calibration text has only {len(tokens)} tokens (asked for {opt.calib_tokens})", file=sys.stderr)
    ckpt = checkpoint_path(out_p)
    auto_levels = [lv for lv in levels if lv in AUTO_LEVELS] or [float(opt.default_level)]
    rules = AUTO_RULES if opt.rule == "auto" else (opt.rule,)
    if opt.rule == "auto" and len(windows) < 2:
        print(f"note: --rule auto needs {2 * opt.ctx} calibration tokens beyond --calib-tokens (has "
              f"{len(held)}): using the paper's rule", file=sys.stderr)
        rules = ("chess",)
    # the rule choice decodes its windows at each level for each candidate, at about calibration's speed
    scored = len(rules) * len(auto_levels) * len(windows) * opt.ctx if len(rules) > 1 else 0
    st = calibrate(model, tokens, ctx=opt.ctx, threads=opt.threads, progress=opt.progress,
                   keep_rows=opt.budget_rows if opt.budget else 0, keep_signed=opt.budget,
                   checkpoint=ckpt, checkpoint_every=opt.checkpoint_every, after_tokens=scored)
    t_calib = time.perf_counter() - t0
    n_layer = model.n_layer
    model.close()

    col = None
    if "wchess" in rules:  # column norms of the original W_down (not of its requantized copy)
        col = [column_norms(fmt.tensor_f32(reader, f"blk.{il}.ffn_down.weight")) for il in range(n_layer)]
    cands = {}
    for rule in rules:
        layer_levels = None
        if opt.budget:
            layer_levels = layer_budget(st, levels, opt.stat, rule, col,
                                        lambda il: fmt.tensor_f32(reader, f"blk.{il}.ffn_down.weight"), opt.budget_span)
        cands[rule] = compute_thresholds(st, levels, opt.stat, rule, col, layer_levels)
    # The statistics are done with: keep each candidate's realised sparsity, free the histograms
    # (n_ff x 768 counts per layer, 1.4 GB on an 8B model) before the copies are made.
    sps = {r: calib_sparsity(st, thr, levels) for r, thr in cands.items()}
    head_thr = head_thresholds(st.hist_head, hs, inp_p) if hs else None
    head_sp = [hist_fraction_below(st.hist_head, t) if t > 0 else 0.0 for t in head_thr] if hs else None
    n_tokens, st = st.n_tokens, None
    gc.collect()
    trim_heap()
    no_q = fused_qkv_layers(reader, n_layer)

    def copies(reader) -> tuple[list, set]:
        """The transposed copies, and the original tensors they replace (compact layout)."""
        wts = transposed_tensors(reader, n_layer, wt_type, opt.progress, opt.layout,
                                 exact=opt.wt_type in (None, "x4"), no_q=no_q)
        if not opt.attention:
            wts = [w for w in wts if w[0].endswith("chess_wt_down")]
        drop = set()
        if opt.layout == "compact":  # the copies take the originals' names and places in memory
            renamed = []
            for name, data, qt in wts:
                il, kind = name.split(".")[1], name.split(".")[2]
                orig = f"blk.{il}.{fmt.TRANSPOSED_OF[kind]}"
                drop.add(orig)
                renamed.append((orig, data, qt))
            wts = renamed
        if head_thr is not None:  # the head keeps its original (prompts, and levels where it is dense)
            wts.append(head_copy(reader))
        return wts, drop

    wts, drop = copies(reader)
    wt_types = sorted({"x4" if w[2] == QT.I8 else str(w[2].name if w[2] is not None else w[1].dtype) for w in wts})
    kv = {
        "chess.version": (fmt.FORMAT_VERSION, VT.UINT32, None),
        "chess.levels": (levels, VT.ARRAY, VT.FLOAT32),
        "chess.default_level": (float(opt.default_level), VT.FLOAT32, None),
        "chess.stat": (opt.stat, VT.STRING, None),
        "chess.rule": (next(iter(cands)), VT.STRING, None),
        "chess.budget": ("ffn-layer" if opt.budget else "uniform", VT.STRING, None),
        "chess.activation": (act_kind, VT.STRING, None),
        "chess.attention": (bool(opt.attention), VT.BOOL, None),
        "chess.calib_tokens": (int(n_tokens), VT.UINT64, None),
        "chess.calib_sha256": (text_sha, VT.STRING, None),
        "chess.tool_version": (f"chess_gguf {__version__}", VT.STRING, None),
        "chess.layout": (opt.layout, VT.STRING, None),
    }
    if hs:
        kv["chess.head_sparsity"] = (hs, VT.ARRAY, VT.FLOAT32)  # informational: the runtime reads output.chess_thr
    # Written once: with several candidate rules, the output is written (to a hidden file beside it)
    # with the first one's thresholds, the candidates are scored on it in place, and the winner's
    # thresholds and name are patched in before it is renamed into place.
    scores, rule = None, kv["chess.rule"][0]
    head_t = [(fmt.HEAD_THR, head_thr, None)] if head_thr is not None else []
    tensors = threshold_tensors(cands[rule], opt.attention, no_q) + head_t
    if len(cands) == 1:
        write_with_extras(reader, out_p, kv, tensors + wts, progress=opt.progress, drop=drop)
    else:
        tmp = out_p.with_name(f".{out_p.name}.rule-{os.getpid()}")
        with sigterm_as_interrupt():
            try:
                write_with_extras(reader, tmp, kv, tensors + wts, progress=opt.progress, drop=drop, named=out_p)
                # Scoring maps the written file: drop the copies and the input's pages first (read
                # while writing, they count in the RSS), or the peak is input + copies + output.
                del wts, tensors
                gc.collect()
                trim_heap()
                gguf_io.release_pages(reader)
                bar = None
                if opt.progress:
                    from tqdm import tqdm
                    bar = tqdm(total=scored, unit="tok", dynamic_ncols=True,
                               desc=f"choosing the rule ({', '.join(cands)}; held-out NLL at level "
                                    f"{', '.join(f'{x:g}' for x in auto_levels)})")
                scores = choose_rule(tmp, cands, windows, auto_levels, opt.threads, bar)
                if bar is not None:
                    bar.close()
                    print("  " + ", ".join(f"{r} {v:.4f}" for r, v in scores.items()), file=sys.stderr, flush=True)
                rule = min(scores, key=scores.get)
                if rule != kv["chess.rule"][0] and not patch_string(tmp, "chess.rule", rule):
                    kv["chess.rule"] = (rule, VT.STRING, None)  # the header would move the data: write again
                    wts, drop = copies(reader)
                    write_with_extras(reader, tmp, kv, threshold_tensors(cands[rule], opt.attention, no_q) + head_t + wts,
                                      progress=opt.progress, drop=drop, named=out_p)
                os.replace(tmp, out_p)
            finally:
                tmp.unlink(missing_ok=True)
    ckpt.unlink(missing_ok=True)  # the output is in place: the statistics are no longer needed
    sp = sps[rule]
    size_in, size_out = inp_p.stat().st_size, out_p.stat().st_size
    return {
        "output": str(out_p), "arch": arch, "rule": rule, "rule_scores": scores, "budget": bool(opt.budget), "levels": levels, "layout": opt.layout, "n_tokens": n_tokens,
        "seconds": time.perf_counter() - t0, "calib_seconds": t_calib,
        "size_in": size_in, "size_out": size_out, "sparsity": sp, "wt_types": wt_types, "head_sparsity": head_sp,
    }


def print_summary(res: dict, file=sys.stdout) -> None:
    sp = res["sparsity"]
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"wrote {res['output']} ({res['arch']}, rule {res['rule']}{' + per-layer budget' if res.get('budget') else ''}, {res['layout']} layout, {res['n_tokens']} calibration tokens, "
      f"transposed copies: {', '.join(res['wt_types'])})")
    p("realised sparsity on the calibration text (mean over layers [min..max]):")
    head = res.get("head_sparsity")
    p(f"  {'level':>5}  {'chess ffn':>18}  {'cats ffn':>18}  {'attn q':>18}  {'attn o':>18}" + ("    head" if head else ""))
    for k, lv in enumerate(res["levels"]):
        cells = [f"{sp[n][k].mean():.3f} [{sp[n][k].min():.2f}..{sp[n][k].max():.2f}]"
                 for n in ("chess", "cats", "attn_q", "attn_o")]
        p(f"  {lv:>5.2f}  " + "  ".join(f"{c:>18}" for c in cells) + (f"  {head[k]:>6.3f}" if head else ""))
    over = res["size_out"] / res["size_in"] - 1
    p(f"time {res['seconds']:.1f} s (calibration {res['calib_seconds']:.1f} s); "
      f"size {res['size_in'] / 1e6:.1f} MB -> {res['size_out'] / 1e6:.1f} MB (+{100 * over:.1f}%)")
