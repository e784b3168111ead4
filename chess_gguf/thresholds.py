"""Threshold math of CATS and CHESS (pure numpy; DESIGN-NOTES section 1).

Inputs are calibration samples: rows are tokens, columns channels. For a sparsity level s:
- CATS:  one scalar per layer, the s-quantile of |act(g)| over tokens x channels.
- CHESS: m_i = E|u_i| (or RMS), T = s-quantile of |act(g_i)| * m_i, tau_i = T / m_i;
         channel i is kept iff |act(g_i)| >= tau_i.
- attention: one scalar per layer, the s-quantile of |x| of the W_q (or W_o) input.
Quantiles are global over tokens x channels; the reference code averaged per-document
quantiles, which lands within noise of this. Calibration streams every token into log-spaced
histograms (per channel for |act(g)|, per layer for the attention inputs), so the quantiles cover
all calibration tokens without storing them: `hist_*` below. Sample-based functions (numpy's
linear-interpolation quantile) serve small inputs and the tests.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

ACTS = ("silu", "gelu")


def act(g: np.ndarray, kind: str) -> np.ndarray:
    """The gate activation as llama.cpp computes it (GELU: tanh approximation)."""
    g = np.asarray(g, dtype=np.float32)
    if kind == "silu":
        return g / (1.0 + np.exp(-g))
    if kind == "gelu":
        c = np.float32(np.sqrt(2.0 / np.pi))
        return 0.5 * g * (1.0 + np.tanh(c * (g + np.float32(0.044715) * g * g * g)))
    raise ValueError(f"unknown activation {kind!r} (expected one of {ACTS})")


def check_levels(levels) -> np.ndarray:
    lv = np.asarray(levels, dtype=np.float64)
    if lv.ndim != 1 or lv.size == 0:
        raise ValueError("levels: need at least one level")
    if not np.all((lv > 0) & (lv < 1)):
        raise ValueError(f"levels must lie strictly inside (0, 1), got {list(levels)}")
    if np.any(np.diff(lv) <= 0):
        raise ValueError(f"levels must be strictly increasing, got {list(levels)}")
    return lv


def scalar_thresholds(abs_x: np.ndarray, levels) -> np.ndarray:
    """Per-layer scalar thresholds: the level-quantiles of |x| over all elements. -> [n_levels]"""
    lv = check_levels(levels)
    return np.quantile(np.abs(np.asarray(abs_x, dtype=np.float32)).ravel(), lv).astype(np.float32)


def chess_thresholds(abs_a: np.ndarray, m: np.ndarray, levels) -> np.ndarray:
    """Per-channel CHESS thresholds tau[level, channel] from |act(g)| samples [N, C] and m [C].

    A channel whose statistic m_i is 0 never contributes (u_i is always 0): its threshold is +inf.
    """
    lv = check_levels(levels)
    a = np.abs(np.asarray(abs_a, dtype=np.float32))
    m = np.asarray(m, dtype=np.float32)
    if a.ndim != 2 or m.shape != (a.shape[1],):
        raise ValueError(f"shape mismatch: samples {a.shape}, statistic {m.shape}")
    T = np.quantile((a * m[None, :]).ravel(), lv)  # [n_levels]
    with np.errstate(divide="ignore"):
        tau = np.where(m[None, :] > 0, T[:, None] / m[None, :], np.inf)
    return tau.astype(np.float32)


def channel_stat(sum_abs: np.ndarray, sum_sq: np.ndarray, n: int, stat: str) -> np.ndarray:
    """m_i from running sums: "mean-abs" = E|u_i| (paper), "rms" = sqrt(E u_i^2) (2024 code)."""
    if n <= 0:
        raise ValueError("no calibration tokens")
    if stat == "mean-abs":
        return (np.asarray(sum_abs, dtype=np.float64) / n).astype(np.float32)
    if stat == "rms":
        return np.sqrt(np.asarray(sum_sq, dtype=np.float64) / n).astype(np.float32)
    raise ValueError(f"unknown statistic {stat!r} (expected mean-abs or rms)")


def realised_sparsity(abs_a: np.ndarray, thr: np.ndarray) -> float:
    """Fraction of elements dropped (|a| < thr; thr broadcasts over rows)."""
    a = np.abs(np.asarray(abs_a, dtype=np.float32))
    return float(np.mean(a < np.asarray(thr, dtype=np.float32)))


# --- streaming histograms: log-spaced bins of |x| from 1e-7 to 1e3 ----------------------------
# Per-channel histograms of |act(g_i)| use 768 bins (3% relative width); per-layer histograms
# (CATS, attention inputs) use 65536 bins (0.035%), fine enough to resolve the density spike of
# |SiLU| at its minimum 0.2785. Interpolating inside a bin keeps the realised sparsity of the
# thresholds within 0.5 point of the exact quantile's (tests/test_convert.py).
HIST_BINS = 768
FINE_BINS = 65536
LOG_LO, LOG_HI = float(np.log(1e-7)), float(np.log(1e3))


def bin_width(bins: int) -> float:
    return (LOG_HI - LOG_LO) / bins


def _log_centers(bins: int) -> np.ndarray:
    return LOG_LO + bin_width(bins) * (np.arange(bins) + 0.5)


def hist_index(abs_x: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """Bin of each |x| (zeros and tiny values land in bin 0, huge ones in the last bin)."""
    lg = np.log(np.maximum(np.abs(abs_x), np.float32(1e-30)))
    return np.clip(((lg - LOG_LO) / bin_width(bins)).astype(np.int64), 0, bins - 1)


def _weighted_quantiles(counts: np.ndarray, log_centers: np.ndarray, levels) -> np.ndarray:
    """Quantiles of a distribution given as (count, log-value) bins, interpolated in log space."""
    c = counts.ravel().astype(np.float64)
    x = log_centers.ravel()
    keep = c > 0
    c, x = c[keep], x[keep]
    order = np.argsort(x, kind="stable")
    c, x = c[order], x[order]
    below = np.cumsum(c) - 0.5 * c                 # mass below each bin's center
    return np.exp(np.interp(np.asarray(levels, dtype=np.float64) * c.sum(), below, x))


def hist_scalar_thresholds(hist: np.ndarray, levels) -> np.ndarray:
    """Per-layer scalar thresholds from a histogram of |x| [bins] (CATS, attention)."""
    lv = check_levels(levels)
    h = np.asarray(hist)
    return _weighted_quantiles(h, _log_centers(h.shape[-1]), lv).astype(np.float32)


def hist_chess_thresholds(hist: np.ndarray, m: np.ndarray, levels) -> np.ndarray:
    """CHESS tau[level, channel] from per-channel histograms of |act(g)| [C, bins] and m [C]."""
    lv = check_levels(levels)
    h = np.asarray(hist)
    m = np.asarray(m, dtype=np.float32)
    log_m = np.where(m > 0, np.log(np.maximum(m, 1e-38)), LOG_LO - 100.0)  # m = 0: always dropped
    T = _weighted_quantiles(h, _log_centers(h.shape[-1])[None, :] + log_m[:, None], lv)
    with np.errstate(divide="ignore"):
        tau = np.where(m[None, :] > 0, T[:, None] / m[None, :], np.inf)
    return tau.astype(np.float32)


def hist_fraction_below(hist: np.ndarray, thr) -> float:
    """Fraction of histogram mass below thr (per channel [C] with hist [C, bins], or scalar with [bins])."""
    h = np.atleast_2d(np.asarray(hist, dtype=np.float64))
    bins = h.shape[1]
    t = np.broadcast_to(np.asarray(thr, dtype=np.float64).reshape(-1), (h.shape[0],))
    with np.errstate(divide="ignore"):
        pos = (np.log(t) - LOG_LO) / bin_width(bins)   # threshold position in bins
    full = np.clip(np.floor(pos), 0, bins).astype(np.int64)
    cum = np.concatenate([np.zeros((h.shape[0], 1)), np.cumsum(h, axis=1)], axis=1)
    rows = np.arange(h.shape[0])
    below = cum[rows, full]
    part = np.where(full < bins, h[rows, np.minimum(full, bins - 1)] * np.clip(pos - full, 0, 1), 0)
    return float((below + part).sum() / max(h.sum(), 1))


# --- beyond the paper: threshold rules and a per-layer budget (issue #9, docs/results.md) -----
# Every rule below thresholds a per-channel score |act(g_i)| * w_i with one scalar T per layer and
# level (T = the level-quantile of the score on calibration tokens x channels), so it is stored as
# tau_i = T / w_i in blk.N.chess_ffn_tau and runs through the runtime's "chess" method unchanged.
#   chess   w_i = m_i (E|u_i| or RMS(u_i), --stat): the paper.
#   cats    w_i = 1: one threshold per layer (the same as the CATS scalar, stored per channel).
#   wchess  w_i = m_i * ||W_down[:, i]||_2: the expected size of channel i's contribution to the FFN
#           OUTPUT, not just to the product g*u. Dropping channel i changes the output by
#           a_i u_i W_down[:, i]; with squared error and independent channels the optimum keeps
#           channels by |a_i| * RMS(u_i) * ||W_down[:, i]||. The column norm is a property of the
#           weights, so it does not shift with the text domain.
RULES = ("chess", "cats", "wchess")


def column_norms(w_down: np.ndarray) -> np.ndarray:
    """||W_down[:, i]||_2 for W_down in numpy shape [n_embd, n_ff] -> [n_ff]."""
    return np.linalg.norm(np.asarray(w_down, dtype=np.float32), axis=0).astype(np.float32)


def rule_weights(rule: str, m: np.ndarray, col_norm: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-channel weight w_i of a rule (see RULES); the score is |act(g_i)| * w_i."""
    m = np.asarray(m, dtype=np.float32)
    if rule == "chess":
        return m
    if rule == "cats":
        return np.ones_like(m)
    if rule == "wchess":
        if col_norm is None or np.shape(col_norm) != m.shape:
            raise ValueError(f"rule wchess needs the W_down column norms [{m.shape[0]}], got "
                             f"{None if col_norm is None else np.shape(col_norm)}")
        return (m * np.asarray(col_norm, dtype=np.float32)).astype(np.float32)
    raise ValueError(f"unknown rule {rule!r} (expected one of {', '.join(RULES)})")


def ffn_output_error(a: np.ndarray, u: np.ndarray, keep: np.ndarray, w_down: np.ndarray) -> float:
    """Relative squared error of the FFN output when only `keep` channels are computed:
    sum over rows ||W_down (dropped * a * u)||^2 / sum over rows ||W_down (a * u)||^2.
    a = act(g) and u signed [rows, n_ff], keep bool (broadcasts), w_down [n_embd, n_ff]."""
    h = np.asarray(a, dtype=np.float32) * np.asarray(u, dtype=np.float32)
    wd = np.asarray(w_down, dtype=np.float32)
    y = h @ wd.T
    e = np.where(keep, np.float32(0), h) @ wd.T
    den = float(np.square(y, dtype=np.float64).sum())
    return float(np.square(e, dtype=np.float64).sum()) / den if den > 0 else 0.0


def greedy_budget(cost: np.ndarray, grid, target: float, size=None, lo=None, hi=None) -> np.ndarray:
    """Per-part sparsities with size-weighted mean exactly `target` that greedily minimise the summed cost.

    cost [n_parts, n_grid]: each part's cost at each sparsity of `grid` (increasing); size [n_parts]:
    its work (weights read per token; default equal); lo/hi: bounds per part (default grid ends).
    Like TEAL's greedy: start every part at its lower bound and repeatedly move the part whose next
    grid step costs the least per unit of work saved, until the mean reaches the target; the last
    step is taken fractionally (linear interpolation) so the mean is exact."""
    grid = np.asarray(grid, dtype=np.float64)
    c = np.maximum.accumulate(np.asarray(cost, dtype=np.float64), axis=1)  # a cost never falls with sparsity
    n, k = c.shape
    if grid.shape != (k,) or np.any(np.diff(grid) <= 0):
        raise ValueError("grid: need one increasing sparsity per cost column")
    size = np.ones(n) if size is None else np.asarray(size, dtype=np.float64)
    lo_i = np.zeros(n, np.int64) if lo is None else np.searchsorted(grid, np.broadcast_to(lo, (n,)) - 1e-12)
    hi_i = np.full(n, k - 1) if hi is None else np.searchsorted(grid, np.broadcast_to(hi, (n,)) + 1e-12, "right") - 1
    if np.any(lo_i > hi_i):
        raise ValueError("greedy_budget: empty bounds")
    W = size.sum()
    if not (size @ grid[lo_i] / W <= target + 1e-12 and target <= size @ grid[hi_i] / W + 1e-12):
        raise ValueError(f"greedy_budget: target {target} outside what the bounds allow")
    idx = lo_i.copy()
    s = grid[idx].astype(np.float64)
    while True:
        mean = size @ s / W
        if mean >= target - 1e-12:
            return s
        nxt = np.minimum(idx + 1, k - 1)
        gain = (grid[nxt] - grid[idx]) * size                     # work saved by the step
        step_cost = np.where(idx < hi_i, (c[np.arange(n), nxt] - c[np.arange(n), idx]) / np.maximum(gain, 1e-300),
                             np.inf)
        j = int(np.argmin(step_cost))
        if not np.isfinite(step_cost[j]):
            return s
        need = (target - mean) * W                                # work still to save
        if gain[j] >= need:
            s[j] += need / size[j]
            return s
        idx[j] += 1
        s[j] = grid[idx[j]]


def error_curve(a: np.ndarray, u: np.ndarray, w: np.ndarray, w_down: np.ndarray, grid) -> np.ndarray:
    """Squared FFN output error sum_rows ||W_down (dropped * a * u)||^2 at each sparsity of `grid`, when
    channels are dropped by the score |a_i| * w_i with one threshold (the grid-quantile of the score on
    these rows). a = act(g) and u signed [rows, n_ff]; w [n_ff]; w_down [n_embd, n_ff]. -> [len(grid)]"""
    a = np.asarray(a, dtype=np.float32)
    h = a * np.asarray(u, dtype=np.float32)
    wd = np.asarray(w_down, dtype=np.float32)
    sc = np.abs(a) * np.asarray(w, dtype=np.float32)[None, :]
    qs = np.quantile(sc.ravel(), np.asarray(grid, dtype=np.float64))
    out = np.empty(len(qs))
    for k, q in enumerate(qs):
        e = np.where(sc < q, h, np.float32(0)) @ wd.T
        out[k] = float(np.square(e, dtype=np.float64).sum())
    return out
