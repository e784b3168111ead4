"""Token windows: the two ways the commands cut a text into --ctx windows, BOS handling, and the
held-out NLL of a perplexity window (used by eval and by convert's rule choice).

- Statistics (calibrate, inspect): consecutive pieces of ctx - 1 text tokens, each decoded after
  BOS (ctx tokens when the model adds no BOS); the BOS row itself is left out of the statistics.
- Perplexity (eval, convert --rule auto), as llama-perplexity cuts them: consecutive full windows
  of ctx tokens whose first token is replaced by BOS; the second half of each window is scored.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from .runtime import Context

MIN_PIECE = 8  # a statistics piece shorter than this (the text's tail) is dropped
# ggml's CPU flash attention uses an fp32 tiled kernel for ubatches of at least this many query rows
# and rounds Q to f16 below it (GGML_FA_TILE_Q), so logits depend slightly on how tokens are batched.
FA_TILE_ROWS = 64


def bos_tokens(model) -> list[int]:
    """[BOS] when the model's vocabulary adds one, else []."""
    return model.tokenize("", add_special=True)[:1] if model.add_bos else []


def led_by_bos(tokens: Sequence[int], ctx: int, bos: Sequence[int]) -> list[list[int]]:
    """Statistics pieces: the text tokens of each window (the caller decodes bos + piece)."""
    win = ctx - len(bos)
    pieces = [list(tokens[s:s + win]) for s in range(0, len(tokens), win)]
    return [p for p in pieces if len(p) >= MIN_PIECE]


def bos_replacing(tokens: Sequence[int], ctx: int, bos: Sequence[int], n_max: Optional[int] = None) -> list[list[int]]:
    """Perplexity windows: full windows of ctx tokens, the first token of each replaced by BOS
    (when the model has one); at most n_max of them."""
    n = len(tokens) // ctx
    if n_max is not None:
        n = min(n, n_max)
    out = []
    for i in range(n):
        w = list(tokens[i * ctx:(i + 1) * ctx])
        w[:len(bos)] = bos
        out.append(w)
    return out


def log_softmax_at(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for each row i, in float64."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m, dtype=np.float32).sum(axis=1, dtype=np.float64)) + m[:, 0].astype(np.float64)
    picked = x[np.arange(len(targets)), np.asarray(targets, dtype=np.int64)].astype(np.float64)
    return picked - lse


def window_logits(ctx: Context, w: list[int]) -> np.ndarray:
    """Logits of a perplexity window's scored rows: positions n/2 .. n-2, predicting w[n/2+1:]."""
    first = len(w) // 2
    ctx.clear()
    if first >= FA_TILE_ROWS:  # both halves take ggml's fp32 attention path, as one batch would
        ctx.decode(w[:first], pos0=0, logits="none")
        logits = ctx.decode(w[first:], pos0=first, logits="all")  # rows for positions first .. n-1
    else:
        logits = ctx.decode(w, pos0=0, logits="all")[first:]
    return logits[:-1]


def window_nll(ctx: Context, w: list[int], logits: Optional[np.ndarray] = None) -> tuple[float, int]:
    """(sum of NLL over the scored second half, number of scored tokens) of one window (from its
    window_logits when the caller has them)."""
    lp = log_softmax_at(window_logits(ctx, w) if logits is None else logits, w[len(w) // 2 + 1:])
    return float(-lp.sum()), len(lp)
