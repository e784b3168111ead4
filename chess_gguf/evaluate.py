"""`eval`: perplexity and the paper's 8 zero-shot tasks, dense and per method x level.

Perplexity (llama-perplexity's protocol). The whole text is tokenized once (BOS first if the
model adds BOS; one trailing newline dropped, as llama.cpp's -f does) and cut into
non-overlapping windows of n_ctx tokens; the first token of each window is replaced by BOS when
the model adds BOS. Each window is decoded from an empty cache; only its second half is scored:
the logits at positions n_ctx/2 .. n_ctx-2 predict the tokens at n_ctx/2+1 .. n_ctx-1
(n_ctx - n_ctx/2 - 1 tokens per window). Perplexity = exp(mean negative log-likelihood).
--ppl-tokens caps the text at floor(cap / n_ctx) windows. Several texts (`--ppl wiki,books,FILE`:
files or the domain names of chess_gguf.data.DOMAINS) are scored one after the other, each with its
own perplexity and realised sparsity; the row's "ppl" is the first text's.

Zero-shot tasks (lm-evaluation-harness's loglikelihood protocol, 0-shot). Each choice is a
(context, continuation) request; whitespace at the end of the context moves to the start of the
continuation; context+continuation is tokenized together, the context alone, and the
continuation is the combined tokens after the context's token count. The model input is BOS (if
the model adds BOS) + context tokens + continuation tokens, left-truncated to TASK_CTX tokens.
Score = sum of log P(continuation token | everything before it). acc = argmax of the score; acc_norm
= argmax of score / len(choice) with len in characters of the choice without its leading space
(lm-eval's completion_len; the same as UTF-8 bytes for ASCII choices), reported for arc_easy,
arc_challenge, hellaswag, openbookqa, piqa, sciq (not boolq, winogrande, as lm-eval). winogrande
uses partial scoring: each option completes a different context, all share one continuation.
Ties go to the first choice (numpy argmax, as lm-eval).

Speed: a question's requests share the tokens their contexts have in common. Ordinary multiple
choice decodes the context once into the KV cache (its last logits row scores every choice's
first token), then each choice decodes its continuation minus the last token, which is removed
again (seq_rm) for the next choice; a one-token choice costs no decode at all. winogrande's two
contexts share their common token prefix; each decodes its own tail.

Numerics: ggml's CPU flash attention computes with Q in f16 for ubatches of fewer than 64 query
rows and in fp32 (tiled kernel) from 64 rows, so llama.cpp's logits for a token depend a little
on how many tokens were decoded together with it. Perplexity decodes half windows of >= 64 tokens
(the same path as llama-perplexity's full windows); short task tails take the f16 path.

Sparse rows set the runtime to (method, level) with masks on every token (prefill "masked", the
paper's evaluation); realised sparsity is the runtime's counters over that row's runs.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .bench import STATS_PART, decode_bytes, read_file
from .data import DOMAINS, TASKS, default_eval_path, domain_path, load_task, task_path
from .options import METHODS
from .runtime import Context, Model
from .kld import paired, summary as kld_summary, token_kld
from .windows import bos_replacing, bos_tokens, log_softmax_at, window_logits, window_nll

# Tasks for which lm-evaluation-harness reports acc_norm (its yaml lists the metric).
ACC_NORM_TASKS = frozenset({"arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa", "sciq"})
SEED = 1234          # --limit subsample seed
TASK_CTX = 2048      # longest task input (lm-eval's default max_length); longer inputs lose their start
N_BATCH = 512        # llama.cpp's default ubatch


# --- argument parsing (used by the CLI; raise ValueError with a readable message) ------------

def resolve_ppl(spec: str) -> list[tuple[str, str]]:
    """--ppl value -> [(label, file)]: "" = the Wikipedia evaluation split; otherwise comma-separated
    domain names (wiki, books, news, science: chess_gguf.data.DOMAINS) or file paths."""
    if not spec.strip():
        return [("wiki", str(default_eval_path()))]
    out = []
    for x in (p.strip() for p in spec.split(",")):
        if not x:
            continue
        if x in DOMAINS:
            out.append((x, str(domain_path(x))))
        else:
            out.append((Path(x).stem, x))
    if not out:
        raise ValueError("--ppl: no text given")
    labels = [lb for lb, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--ppl: two texts with the same name ({', '.join(labels)})")
    return out


# --- small numeric helpers --------------------------------------------------------------------

def binom_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else float("nan")


def subsample(n_items: int, limit: Optional[int]) -> list[int]:
    """Indices of a fixed, seeded subsample of `limit` items (all items when limit is None or larger)."""
    if limit is None or limit >= n_items:
        return list(range(n_items))
    return sorted(random.Random(SEED).sample(range(n_items), limit))


# --- tokenization (lm-eval's context/continuation split) --------------------------------------

def encode_pair(model: Model, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens with BOS if the model adds BOS, continuation tokens), split as lm-eval does."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    whole = model.tokenize(context + continuation, add_special=False)
    ctx = model.tokenize(context, add_special=False)
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing after {context[-40:]!r}")
    ctx = bos_tokens(model) + ctx
    if not ctx:  # empty context and no BOS: condition on the BOS token anyway (lm-eval uses EOT)
        ctx = [model.bos]
    return ctx, cont


def task_requests(record: dict) -> tuple[list[tuple[str, str]], int]:
    """(context, continuation) per choice of one task record, and the gold index."""
    if "contexts" in record:  # winogrande: partial scoring
        return [(c, record["continuation"]) for c in record["contexts"]], int(record["gold"])
    return [(record["context"], ch) for ch in record["choices"]], int(record["gold"])


def choice_length(continuation: str) -> int:
    """lm-eval's acc_norm normalizer: characters of the choice text, without the target delimiter."""
    return max(1, len(continuation[1:] if continuation.startswith(" ") else continuation))


# --- scoring ------------------------------------------------------------------------------------

def score_requests(ctx: Context, reqs: Sequence[tuple[list[int], list[int]]],
                   max_len: int = TASK_CTX) -> tuple[list[float], int]:
    """Sum of log P(continuation | context) for each (context tokens, continuation tokens) request.

    The contexts' common token prefix is decoded once (sequence 0); each request then decodes its
    own tail and the tail is removed again. Returns (log-likelihoods, tokens decoded)."""
    fitted = []
    for c, k in reqs:
        if len(c) + len(k) - 1 > max_len:  # lm-eval keeps the last max_len+1 tokens of context+continuation
            keep = max_len + 1 - len(k)
            if keep < 1:
                raise ValueError(f"a continuation of {len(k)} tokens does not fit in {max_len} tokens")
            c = c[len(c) - keep:]
        fitted.append((list(c), list(k)))
    first = fitted[0][0]
    ctx.clear()
    lls = []
    if all(c == first for c, _ in fitted):
        # ordinary multiple choice: decode the context once; its last row predicts every choice's first
        # token, and each choice decodes only its continuation minus the last token
        row0 = ctx.decode(first, pos0=0, logits="last")[None, :]
        n_dec, p = len(first), len(first)
        for _, k in fitted:
            ll = float(log_softmax_at(row0, k[:1])[0])
            if len(k) > 1:
                logits = ctx.decode(k[:-1], pos0=p, logits="all")
                n_dec += len(k) - 1
                ll += float(log_softmax_at(logits, k[1:]).sum())
                ctx.seq_rm(0, p, -1)
            lls.append(ll)
        return lls, n_dec
    # different contexts (winogrande): share their common token prefix, leaving every request at
    # least its last context token to decode
    p = min(len(c) for c, _ in fitted) - 1
    for c, _ in fitted[1:]:
        q = 0
        while q < p and c[q] == first[q]:
            q += 1
        p = q
    n_dec = 0
    if p > 0:
        ctx.decode(first[:p], pos0=0, logits="none")
        n_dec += p
    for c, k in fitted:
        tail = c[p:] + k[:-1]
        logits = ctx.decode(tail, pos0=p, logits="all")
        n_dec += len(tail)
        rows = logits[len(c) - p - 1:]  # the last context token predicts k[0], and so on
        assert rows.shape[0] == len(k)
        lls.append(float(log_softmax_at(rows, k).sum()))
        ctx.seq_rm(0, p, -1)
    return lls, n_dec


@dataclass
class TaskItem:
    reqs: list[tuple[list[int], list[int]]]
    lengths: list[int]
    gold: int


def prepare_task(model: Model, task: str, limit: Optional[int]) -> list[TaskItem]:
    records = load_task(task)
    items = []
    for i in subsample(len(records), limit):
        pairs, gold = task_requests(records[i])
        items.append(TaskItem([encode_pair(model, c, k) for c, k in pairs], [choice_length(k) for _, k in pairs], gold))
    return items


def score_item(ctx: Context, item: TaskItem) -> tuple[int, int, list[float], int]:
    """(acc, acc_norm, log-likelihoods, tokens decoded) of one question."""
    lls, n = score_requests(ctx, item.reqs)
    ll = np.array(lls)
    acc = int(int(np.argmax(ll)) == item.gold)
    acc_norm = int(int(np.argmax(ll / np.array(item.lengths, dtype=np.float64))) == item.gold)
    return acc, acc_norm, lls, n


# --- perplexity -------------------------------------------------------------------------------

def read_ppl_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: perplexity text not found")
    with open(p, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    return text[:-1] if text.endswith("\n") else text  # as llama.cpp reads -f


def ppl_windows(model: Model, text: str, n_ctx: int, max_tokens: Optional[int]) -> list[list[int]]:
    """Windows exactly as llama-perplexity cuts them (see the module docstring)."""
    toks = model.tokenize(text, add_special=True)
    n = len(toks) // n_ctx
    if max_tokens is not None:
        n = min(n, max_tokens // n_ctx)
    if n < 1:
        raise ValueError(f"perplexity text too short: {len(toks)} tokens, need at least one window of {n_ctx} "
                         f"(and --ppl-tokens >= --ctx)")
    return bos_replacing(toks, n_ctx, bos_tokens(model), n)


# --- the evaluation ---------------------------------------------------------------------------

@dataclass
class Options:
    levels: list[str] = field(default_factory=lambda: ["off", "0.5", "0.7"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ppl: Optional[str] = ""           # text files or domain names, comma-separated; "" = wiki split; None = none
    ppl_tokens: Optional[int] = 16384
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    limit: Optional[int] = None
    ctx: int = 512
    threads: Optional[int] = None
    progress: bool = True
    kld: bool = False                 # KL divergence of each sparse row from the dense row (perplexity texts)


def row_plan(levels: Sequence[str], methods: Sequence[str]) -> list[tuple[str, str]]:
    rows = [("dense", "off")] if "off" in levels else []
    rows += [(m, lv) for m in methods for lv in levels if lv != "off"]
    return rows


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, unit="it", dynamic_ncols=True, leave=False)

    def label(self, s: str) -> None:
        if self.bar is not None:
            self.bar.set_description(s)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


PARTS = ("ffn", "attn_q", "attn_o", "head")


def _segment_sparsity(ctx: Context, dense: bool, segs: list) -> dict:
    """Realised sparsity of what was decoded since the last counter reset, then reset the counters.
    Appends (sparse tokens, per-part sparsity, per-part per-layer sparsity) to segs, from which the
    row's overall figures are combined."""
    if dense:
        return {"realised_sparsity": 0.0, "realised_sparsity_parts": {k: 0.0 for k in PARTS}}
    st = ctx.chess_stats()
    ctx.chess_stats_reset()
    parts = {k: st[k]["sparsity"] for k in PARTS}
    segs.append((st["tokens"], parts, {k: st[k]["per_layer"] for k in PARTS}))
    return {"realised_sparsity": parts["ffn"], "realised_sparsity_parts": parts}


def _combine(segs: list) -> dict:
    """Token-weighted overall sparsity per part over the row's segments (texts, then tasks)."""
    out = {}
    for k in PARTS:
        xs = [(n, p[k]) for n, p, _ in segs if p[k] is not None and n > 0]
        out[k] = sum(n * v for n, v in xs) / sum(n for n, _ in xs) if xs else None
    return out


def _combine_layers(segs: list) -> dict:
    """The same per layer (NaN where a layer counted nothing), keyed as bench.decode_bytes wants."""
    out = {}
    for short, k in STATS_PART.items():
        rows = [(n, np.asarray(pl[k], dtype=np.float64)) for n, _, pl in segs if n > 0]
        if not rows:
            out[short] = None
            continue
        v = np.stack([x for _, x in rows])
        w = np.array([n for n, _ in rows], dtype=np.float64)[:, None] * ~np.isnan(v)
        with np.errstate(invalid="ignore"):
            out[short] = (np.nansum(v * w, axis=0) / w.sum(axis=0)).tolist()
    return out


def evaluate(path: str, opt: Options, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every row; returns {"results": [...], "config": {...}, "throughput": {...}}."""
    if opt.ppl is None and not opt.tasks:
        raise ValueError("nothing to evaluate: --ppl none and --tasks none")
    if opt.ctx < 16:
        raise ValueError(f"--ctx {opt.ctx}: use at least 16 tokens")
    if opt.kld and (opt.ppl is None or "off" not in opt.levels):
        raise ValueError("--kld compares each sparse row with the dense row on the perplexity texts: "
                         "keep off in --levels and give a --ppl text")
    for t in opt.tasks:
        task_path(t)  # fail early (with the fix) when the data is missing
    model = Model(path)
    info = read_file(path, stock_ok=True)  # tensor sizes: the weight bytes each row reads per token
    plan = row_plan(opt.levels, opt.methods)
    if not plan:
        raise ValueError("no rows: give --levels with off and/or a stored level, and at least one method")
    is_chess = bool(model.chess_levels)
    if not is_chess and any(m != "dense" for m, _ in plan):
        raise ValueError(f"{path}: not a CHESS model, only --levels off is possible (convert it first)")

    ppl_file = None
    texts: list[tuple[str, str, list[list[int]]]] = []  # (label, file, windows)
    if opt.ppl is not None:
        for label, f in resolve_ppl(opt.ppl):
            texts.append((label, f, ppl_windows(model, read_ppl_text(f), opt.ctx, opt.ppl_tokens)))
        ppl_file = texts[0][1]
    windows = [w for _, _, ws in texts for w in ws]
    items = {t: prepare_task(model, t, opt.limit) for t in opt.tasks}

    ctx = Context(model, n_ctx=max(opt.ctx, TASK_CTX), n_batch=N_BATCH, n_threads=opt.threads)
    try:
        for m, lv in plan:  # refuse a level that is not stored before running anything
            if m != "dense":
                try:
                    ctx.chess_set(m, lv, "masked")
                except ValueError as e:
                    raise ValueError(f"{path}: {e}") from None

        def use(i: int) -> None:
            method, level = plan[i]
            if method != "dense":
                ctx.chess_set(method, level, "masked")
            elif is_chess:
                ctx.chess_set(level="off")

        labels = ["dense" if m == "dense" else f"{m} {lv}" for m, lv in plan]
        bar = _Progress((len(windows) + sum(len(v) for v in items.values())) * len(plan), opt.progress)
        results: list[dict] = [{"method": m, "level": lv if lv == "off" else float(lv)} for m, lv in plan]
        secs, n_tok = [0.0] * len(plan), [0] * len(plan)
        segs: list[list] = [[] for _ in plan]
        if is_chess:
            ctx.chess_stats_reset()
        # Perplexity window by window, every row on each window in turn: --kld then compares each
        # sparse row with the dense logits of the same window, and only one window's are kept.
        for name, _, ws in texts:
            nll, cnt = [0.0] * len(plan), [0] * len(plan)
            text_segs: list[list] = [[] for _ in plan]
            kl: list[list] = [[] for _ in plan]
            same: list[list] = [[] for _ in plan]
            for w in ws:
                base = None
                for i, (method, _lv) in enumerate(plan):
                    bar.label(labels[i])
                    use(i)
                    t0 = time.perf_counter()
                    logits = window_logits(ctx, w)
                    a, b = window_nll(ctx, w, logits)
                    secs[i] += time.perf_counter() - t0
                    nll[i], cnt[i], n_tok[i] = nll[i] + a, cnt[i] + b, n_tok[i] + len(w)
                    if method != "dense":
                        _segment_sparsity(ctx, False, text_segs[i])
                    if opt.kld and method == "dense":
                        base = logits
                    elif opt.kld:
                        k, t = token_kld(base, logits)
                        kl[i].append(k)
                        same[i].append(t)
                    bar.step()
            for i, (method, _lv) in enumerate(plan):
                r = results[i]
                parts = {k: 0.0 for k in PARTS} if method == "dense" else _combine(text_segs[i])
                r.setdefault("ppl_texts", {})[name] = {"ppl": math.exp(nll[i] / cnt[i]), "scored_tokens": cnt[i],
                                                       "realised_sparsity": parts["ffn"],
                                                       "realised_sparsity_parts": parts}
                segs[i] += text_segs[i]
                if kl[i]:
                    r.setdefault("kld_texts", {})[name] = kld_summary(kl[i], same[i])
        for i, r in enumerate(results):
            first = r["ppl_texts"][texts[0][0]] if texts else None
            r["ppl"] = first["ppl"] if first else None
            if first:
                r["ppl_scored_tokens"] = first["scored_tokens"]
            if opt.kld and texts:
                r["kld"] = r["kld_texts"][texts[0][0]]["mean"] if "kld_texts" in r else 0.0  # dense: 0
        for i, (method, _lv) in enumerate(plan):
            r = results[i]
            tasks_out = {}
            if items:
                bar.label(labels[i])
                use(i)
                t0 = time.perf_counter()
                for t, its in items.items():
                    acc = accn = 0
                    for it in its:
                        a, an, _, n = score_item(ctx, it)
                        acc, accn, n_tok[i] = acc + a, accn + an, n_tok[i] + n
                        bar.step()
                    n = len(its)
                    pa, pn = acc / n, accn / n
                    norm = t in ACC_NORM_TASKS
                    tasks_out[t] = {"acc": pa, "acc_norm": pn if norm else None, "n": n,
                                    "acc_stderr": binom_stderr(pa, n),
                                    "acc_norm_stderr": binom_stderr(pn, n) if norm else None}
                secs[i] += time.perf_counter() - t0
                _segment_sparsity(ctx, method == "dense", segs[i])
            r["tasks"] = tasks_out
            r["avg_acc"] = float(np.mean([v["acc"] for v in tasks_out.values()])) if tasks_out else None
            if method == "dense":
                r["realised_sparsity"] = 0.0
                r["realised_sparsity_parts"] = {k: 0.0 for k in PARTS}
                r["weight_bytes_per_token"] = decode_bytes(info["tensors"])
            else:
                r["realised_sparsity_parts"] = _combine(segs[i])
                r["realised_sparsity"] = r["realised_sparsity_parts"]["ffn"]
                r["weight_bytes_per_token"] = decode_bytes(info["tensors"], method, _combine_layers(segs[i]),
                                                           info.get("fixed"))
            r["eval_tokens"] = n_tok[i]
            r["seconds"] = round(secs[i], 3)
            r["tokens_per_s"] = n_tok[i] / secs[i] if secs[i] > 0 else None
            log(f"{labels[i]}: {n_tok[i]} tokens in {secs[i]:.1f} s ({n_tok[i] / max(secs[i], 1e-9):.1f} tok/s)")
        bar.close()
        t_all, n_all = sum(secs), sum(n_tok)
    finally:
        ctx.close()
        model.close()
    config = {"model": str(path), "levels": opt.levels, "methods": opt.methods, "ctx": opt.ctx,
              "ppl_file": ppl_file, "ppl_tokens_cap": opt.ppl_tokens, "ppl_windows": len(texts[0][2]) if texts else 0,
              "ppl_texts": [{"name": lb, "file": f, "windows": len(ws)} for lb, f, ws in texts],
              "tasks": opt.tasks, "limit": opt.limit, "seed": SEED, "threads": ctx.n_threads,
              "task_max_len": TASK_CTX, "kld": opt.kld}
    out = {"results": results, "config": config}
    if opt.kld:
        out["kld_pairs"] = kld_pairs(results)
    return {**out, "throughput": {"eval_tokens": n_all, "seconds": round(t_all, 3),
                           "tokens_per_s": n_all / t_all if t_all > 0 else None}}


def kld_pairs(results: list[dict]) -> list[dict]:
    """Paired differences of mean KLD between the methods at each level, per text (a - b: a positive
    difference means a is further from dense)."""
    out = []
    rows = [r for r in results if "kld_texts" in r]
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["level"] != b["level"]:
                continue
            for name in a["kld_texts"]:
                out.append({"text": name, "a": row_label(a), "b": row_label(b),
                            **paired(a["kld_texts"][name], b["kld_texts"][name])})
    return out


# --- output -----------------------------------------------------------------------------------

def _pct_ci(p: Optional[float], n: int) -> str:
    if p is None:
        return "–"
    return f"{100 * p:.1f} ± {100 * 1.96 * binom_stderr(p, n):.1f}"


def row_label(r: dict) -> str:
    return "dense" if r["method"] == "dense" else f"{r['method']} {r['level']:g}"


def _fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(res: dict, metric: str = "acc") -> str:
    """Rows: dense then method x level; columns: each task's metric (percent ± 95% CI), the average
    (acc only), perplexity and realised FFN sparsity."""
    rows = res["results"]
    tasks = list(rows[0]["tasks"]) if rows else []
    if metric != "acc":
        tasks = [t for t in tasks if rows[0]["tasks"][t].get(metric) is not None]
    has_ppl = any(r["ppl"] is not None for r in rows)
    names = list(rows[0].get("ppl_texts") or {}) if rows else []
    multi = len(names) > 1  # several texts: one "ppl NAME (realised sparsity)" column each
    head = ["method", "level"] + tasks
    if metric == "acc" and tasks:
        head.append("avg acc")
    if metric == "acc" and has_ppl:
        head += [f"ppl {n} (sparsity)" for n in names] if multi else ["ppl"]
    head += ["realised sparsity", "weight MB/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['level']:g}" if r["level"] != "off" else "off"]
        cells += [_pct_ci(r["tasks"][t][metric], r["tasks"][t]["n"]) for t in tasks]
        if metric == "acc" and tasks:
            cells.append(_fmt(None if r["avg_acc"] is None else 100 * r["avg_acc"], ".1f"))
        if metric == "acc" and has_ppl:
            if multi:
                cells += [f"{_fmt(r['ppl_texts'][n]['ppl'], '.3f')} ({_fmt(r['ppl_texts'][n]['realised_sparsity'], '.3f')})"
                          for n in names]
            else:
                cells.append(_fmt(r["ppl"], ".3f"))
        cells.append(_fmt(r["realised_sparsity"], ".3f"))
        cells.append(_fmt(r["weight_bytes_per_token"] / 1e6, ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ci_txt(v: Optional[list], spec: str, scale: float = 1.0) -> str:
    return "" if v is None else f" [{format(v[0] * scale, spec)}, {format(v[1] * scale, spec)}]"


def kld_table(res: dict) -> str:
    """Each sparse row's divergence from dense per text: mean KLD with its 95% interval (bootstrap over
    windows), median, 99th percentile, and the share of tokens whose top token is dense's; then the
    paired differences between methods at the same level."""
    head = ["method", "level", "text", "mean KLD [95% CI]", "median", "p99", "same top % [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["results"]:
        for name, k in (r.get("kld_texts") or {}).items():
            lines.append(f"| {r['method']} | {r['level']:g} | {name} | {k['mean']:.4f}{_ci_txt(k['mean_ci95'], '.4f')} "
                         f"| {k['median']:.4f} | {k['p99']:.3f} | "
                         f"{100 * k['same_top']:.1f}{_ci_txt(k['same_top_ci95'], '.1f', 100)} |")
    pairs = res.get("kld_pairs") or []
    if pairs:
        lines += ["", "Paired differences of mean KLD (same windows; an interval that excludes 0 is a real difference):", ""]
        lines += [f"- {p['a']} - {p['b']} ({p['text']}): {p['diff']:+.4f}{_ci_txt(p['ci95'], '+.4f')}" for p in pairs]
    return "\n".join(lines)


def summary_lines(res: dict) -> list[str]:
    c, tp = res["config"], res["throughput"]
    out = []
    texts = c.get("ppl_texts") or []
    if len(texts) > 1:
        out.append("perplexity: " + "; ".join(f"{t['name']} = {t['file']} ({t['windows']} windows)" for t in texts)
                   + f"; windows of {c['ctx']} tokens, second half of each scored (llama-perplexity protocol); "
                   "(sparsity) = realised FFN sparsity on that text")
    elif c["ppl_file"]:
        out.append(f"perplexity: {c['ppl_file']}, {c['ppl_windows']} windows of {c['ctx']} tokens, second half of "
                   f"each scored (llama-perplexity protocol)")
    if c["tasks"]:
        n = {t: v["n"] for t, v in res["results"][0]["tasks"].items()} if res["results"] else {}
        out.append(f"tasks: 0-shot, lm-eval log-likelihood scoring; items per task: "
                   + ", ".join(f"{t} {k}" for t, k in n.items())
                   + (f" (seeded subsample, seed {c['seed']})" if c["limit"] else ""))
    out.append("accuracies in percent ± the 95% interval 1.96·sqrt(p(1-p)/n); sparse rows use masks on every "
               "token; realised sparsity = fraction of FFN channels dropped (runtime counters); weight MB/token = "
               "weight bytes a decoded token reads at the row's realised per-layer sparsities (bench's ideal)")
    tps = tp["tokens_per_s"]
    out.append(f"evaluation throughput: {tp['eval_tokens']} tokens in {tp['seconds']:.1f} s = "
               f"{_fmt(tps, '.1f')} tokens/s ({c['threads']} threads); per row: "
               + ", ".join(f"{row_label(r)} {_fmt(r['tokens_per_s'], '.0f')}" for r in res["results"]))
    return out


def markdown_report(res: dict) -> str:
    c = res["config"]
    parts = [f"# CHESS evaluation: {Path(c['model']).name}", "", markdown_table(res, "acc"), ""]
    if c["tasks"] and any(t in ACC_NORM_TASKS for t in c["tasks"]):
        parts += ["acc_norm (length-normalised, where lm-eval reports it):", "", markdown_table(res, "acc_norm"), ""]
    if any("kld_texts" in r for r in res["results"]):
        parts += ["KL divergence of each sparse row's next-token distributions from the dense row's:", "",
                  kld_table(res), ""]
    parts += [f"- {s}" for s in summary_lines(res)]
    parts += ["", "Realised sparsity per part (FFN, W_q input, W_o input, output head input):", ""]
    for r in res["results"]:
        p = r["realised_sparsity_parts"]
        parts.append(f"- {row_label(r)}: " + ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in p.items()))
    return "\n".join(parts) + "\n"


def write_plots(res: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["results"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    written = []
    for key, ylabel, stem in (("ppl", "perplexity", "ppl"), ("avg_acc", "average accuracy (%)", "acc"),
                              ("kld", "mean KL divergence from dense", "kld")):
        if not any(r.get(key) is not None for r in rows):
            continue
        scale = 100.0 if key == "avg_acc" else 1.0
        # against realised FFN sparsity, and against weight bytes per token (the quality-cost frontier)
        for xkey, xlabel, xscale, suffix, x0 in (
                ("realised_sparsity", "realised FFN sparsity", 1.0, "sparsity", 0.0),
                ("weight_bytes_per_token", "weight MB read per decoded token", 1e-6, "bytes",
                 None if dense is None else dense["weight_bytes_per_token"] * 1e-6)):
            fig, ax = plt.subplots(figsize=(6, 4.2))
            for m in METHODS:
                pts = sorted((r[xkey] * xscale, r[key] * scale, f"{r['level']:g}") for r in rows
                             if r["method"] == m and r.get(key) is not None and r[xkey] is not None)
                if not pts:
                    continue
                xs, ys, lv = zip(*pts)
                ax.plot(xs, ys, marker="o", label=m)
                for x, y, s in pts:
                    ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if dense is not None and dense.get(key) is not None:
                ax.axhline(dense[key] * scale, color="gray", linestyle="--", linewidth=1)
                ax.plot([x0], [dense[key] * scale], marker="s", color="black", linestyle="none", label="dense")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{Path(res['config']['model']).name}: {ylabel} vs {suffix}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / f"{stem}_vs_{suffix}.png", dpi=120)
            plt.close(fig)
            written.append(out / f"{stem}_vs_{suffix}.png")
    return written


def write_outputs(res: dict, out: str | os.PathLike) -> list[Path]:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (d / "results.md").write_text(markdown_report(res))
    return [d / "results.json", d / "results.md"] + write_plots(res, d)
