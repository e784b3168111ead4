"""Threshold math of CATS and CHESS (pure numpy; DESIGN-NOTES section 1).

Inputs are calibration samples: rows are tokens, columns channels. For a sparsity level s:
- CATS:  one scalar per layer, the s-quantile of |act(g)| over tokens x channels.
- CHESS: m_i = E|u_i| (or RMS), T = s-quantile of |act(g_i)| * m_i, tau_i = T / m_i;
         channel i is kept iff |act(g_i)| >= tau_i.
- attention: one scalar per layer, the s-quantile of |x| of the W_q (or W_o) input.
Quantiles are global over tokens x channels (numpy's default linear interpolation); the
reference code averaged per-document quantiles, which lands within noise of this.
"""
from __future__ import annotations

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
