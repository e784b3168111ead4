"""KL divergence of a sparse row's next-token distributions from the dense row's (`eval --kld`).

Per scored token t: KLD_t = sum_v p(v) (log p(v) - log q(v)), p = softmax of the dense logits, q = the
sparse row's, on the same window of the same file (what `llama-perplexity --kl-divergence` reports for
a quantized model against its base). Also whether the two rows' most likely tokens agree ("same top").

Intervals come from a bootstrap over windows, not tokens: the tokens of one window share a context and
their divergences are correlated, so a token-level standard error would be too narrow. Every window
scores the same number of tokens, so a row's mean is the mean of its window means. Two rows scored on
the same windows get a paired interval for the difference of their means: it resolves differences far
smaller than either row's own interval. numpy only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

BOOTSTRAP = 2000   # resamples
SEED = 1234
CHUNK = 32         # logits rows per step: bounds the temporaries to 32 x n_vocab floats


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)


def token_kld(base: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KLD per row in float64, top-1 agreement per row) of logits `other` [n, vocab] from `base`."""
    if base.shape != other.shape:
        raise ValueError(f"logits of different shapes: {base.shape} and {other.shape}")
    kl = np.empty(len(base), dtype=np.float64)
    for s in range(0, len(base), CHUNK):
        lp = _log_softmax(np.asarray(base[s:s + CHUNK], dtype=np.float32))
        lq = _log_softmax(np.asarray(other[s:s + CHUNK], dtype=np.float32))
        kl[s:s + CHUNK] = (np.exp(lp) * (lp - lq)).sum(axis=1, dtype=np.float64)
    return kl, np.argmax(base, axis=1) == np.argmax(other, axis=1)


def _boot_means(per_window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, len(per_window), size=(BOOTSTRAP, len(per_window)))
    return per_window[idx].mean(axis=1)


def _ci(per_window: Sequence[float]) -> Optional[list[float]]:
    """95% percentile interval of the mean over windows (None with fewer than 2 windows)."""
    v = np.asarray(per_window, dtype=np.float64)
    if len(v) < 2:
        return None
    b = _boot_means(v, np.random.default_rng(SEED))
    return [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]


def summary(kl: Sequence[np.ndarray], same: Sequence[np.ndarray]) -> dict:
    """One row on one text from its windows' per-token KLD and top-1 agreement arrays. Keeps the
    per-window means (`windows`, `windows_same_top`) so any two rows can be compared with `paired`."""
    allk = np.concatenate(kl)
    wk = [float(k.mean()) for k in kl]
    ws = [float(s.mean()) for s in same]
    return {"mean": float(allk.mean()), "mean_ci95": _ci(wk), "median": float(np.median(allk)),
            "p99": float(np.percentile(allk, 99)), "max": float(allk.max()),
            "same_top": float(np.concatenate(same).mean()), "same_top_ci95": _ci(ws),
            "tokens": int(len(allk)), "windows": wk, "windows_same_top": ws}


def paired(a: dict, b: dict) -> dict:
    """Mean KLD of row a minus row b (summaries of the same text and windows), with the 95% interval of
    the difference from a bootstrap that resamples the same windows for both rows."""
    wa, wb = np.asarray(a["windows"]), np.asarray(b["windows"])
    if len(wa) != len(wb):
        raise ValueError(f"rows scored on different windows ({len(wa)} and {len(wb)}): not paired")
    d = wa - wb
    return {"diff": float(d.mean()), "ci95": _ci(d)}
