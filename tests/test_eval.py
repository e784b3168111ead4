"""`eval`: perplexity against llama-perplexity, task scoring against an independent decode, output shape,
options and errors. Small on purpose: a few hundred perplexity tokens, --limit 2-3, one thread.

Set CHESS_GGUF_TEST_CHESS_MODEL to an existing SmolLM2 CHESS file (levels 0.5 and 0.7 stored) to skip
the session conversion while developing."""
import json
import os
import re
import subprocess

import numpy as np
import pytest

from chess_gguf import evaluate as E
from chess_gguf import kld as K
from chess_gguf import windows as W
from chess_gguf.data import TASKS, default_eval_path, load_task
from chess_gguf.runtime import Context, Model
from conftest import BIN, run_cli


@pytest.fixture(scope="session")
def chess_model(request):
    env = os.environ.get("CHESS_GGUF_TEST_CHESS_MODEL")
    return env if env else str(request.getfixturevalue("smol_chess"))


@pytest.fixture(scope="session")
def short_text(tmp_path_factory):
    """The first ~6 KB of the evaluation split (about 1400 SmolLM2 tokens)."""
    p = tmp_path_factory.mktemp("ppl") / "wiki_head.txt"
    p.write_text(default_eval_path().read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return p


def _llama_perplexity(model, text, ctx, chunks, env):
    e = dict(os.environ)
    e.update(env)
    r = subprocess.run([str(BIN / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(ctx),
                        "--chunks", str(chunks), "-t", "1"], capture_output=True, text=True, env=e)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-2000:]
    return float(m.group(1))


def test_perplexity_matches_llama_perplexity(chess_model, short_text):
    """Same text, window and number of windows: dense and a sparse row (masks on every token) both agree
    with the patched llama-perplexity within 0.5%."""
    ctx, chunks = 128, 4
    r = run_cli("eval", chess_model, "--ppl", short_text, "--ctx", ctx, "--ppl-tokens", ctx * chunks,
                "--tasks", "none", "--levels", "off,0.5", "--methods", "chess", "--json", "--threads", "1", "-q")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert [(x["method"], x["level"]) for x in rows] == [("dense", "off"), ("chess", 0.5)]
    assert rows[0]["ppl_scored_tokens"] == chunks * (ctx - ctx // 2 - 1)
    ref_dense = _llama_perplexity(chess_model, short_text, ctx, chunks, {"CHESS_LEVEL": "off"})
    ref_sparse = _llama_perplexity(chess_model, short_text, ctx, chunks,
                                   {"CHESS_LEVEL": "0.5", "CHESS_METHOD": "chess", "CHESS_PREFILL": "masked"})
    print("eval", rows[0]["ppl"], rows[1]["ppl"], "llama-perplexity", ref_dense, ref_sparse)
    assert rows[0]["ppl"] == pytest.approx(ref_dense, rel=5e-3)
    assert rows[1]["ppl"] == pytest.approx(ref_sparse, rel=5e-3)
    assert rows[1]["ppl"] > rows[0]["ppl"]


def _llama_kld(model, text, ctx, chunks, tmp_path):
    """llama-perplexity's own KL divergence of chess 0.5 (masks on every token) from the same file dense."""
    base = tmp_path / "base.kld"
    common = [str(BIN / "llama-perplexity"), "-m", str(model), "-c", str(ctx), "-t", "1",
              "--kl-divergence-base", str(base)]
    r = subprocess.run(common + ["-f", str(text), "--chunks", str(chunks)], capture_output=True, text=True,
                       env={**os.environ, "CHESS_LEVEL": "off"})
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(common + ["--kl-divergence"], capture_output=True, text=True,
                       env={**os.environ, "CHESS_LEVEL": "0.5", "CHESS_METHOD": "chess", "CHESS_PREFILL": "masked"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    got = {k: float(re.search(pat, out).group(1)) for k, pat in
           (("mean", r"Mean +KLD: +([0-9.]+)"), ("median", r"Median +KLD: +([0-9.]+)"),
            ("same_top", r"Same top p: +([0-9.]+)"))}
    got["same_top"] /= 100
    return got


def test_kld_matches_llama_perplexity(chess_model, short_text, tmp_path):
    """eval --kld on the same windows agrees with llama-perplexity --kl-divergence (which stores the base
    log-probabilities in 16 bits) on the mean and median KLD and the top-token agreement; and --kld leaves
    every perplexity exactly as without it."""
    ctx, chunks = 128, 4
    args = ["eval", chess_model, "--ppl", short_text, "--ctx", ctx, "--ppl-tokens", ctx * chunks, "--tasks", "none",
            "--levels", "off,0.5", "--methods", "chess", "--json", "--threads", "1", "-q"]
    r = run_cli(*args, "--kld")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    dense, row = res["results"]
    k = row["kld_texts"]["wiki_head"]
    ref = _llama_kld(chess_model, short_text, ctx, chunks, tmp_path)
    print("eval --kld", {x: k[x] for x in ref}, "llama-perplexity", ref)
    assert dense["kld"] == 0.0 and row["kld"] == k["mean"] > 0
    assert k["tokens"] == chunks * (ctx - ctx // 2 - 1) and len(k["windows"]) == chunks
    assert k["mean"] == pytest.approx(ref["mean"], rel=0.01)
    assert k["median"] == pytest.approx(ref["median"], rel=0.02)
    assert abs(k["same_top"] - ref["same_top"]) < 0.01
    lo, hi = k["mean_ci95"]
    assert lo < k["mean"] < hi and k["median"] < k["p99"] <= k["max"]
    plain = json.loads(run_cli(*args).stdout)["results"]
    assert [x["ppl"] for x in plain] == [dense["ppl"], row["ppl"]]
    assert plain[1]["realised_sparsity_parts"] == row["realised_sparsity_parts"]


def test_kld_math():
    """token_kld against float64 by hand; the summary's mean is the token mean; paired differences are
    exact for a shifted row and their interval is far narrower than either row's own."""
    rng = np.random.default_rng(1)
    p = rng.normal(size=(70, 3001)).astype(np.float32) * 4
    q = p + rng.normal(size=p.shape).astype(np.float32) * 0.3
    q[5] = p[5]
    q[6, np.argmax(p[6])] -= 50  # the top token moves
    kl, same = K.token_kld(p, q)
    lp = p - np.log(np.exp(p.astype(np.float64)).sum(1, keepdims=True))
    lq = q - np.log(np.exp(q.astype(np.float64)).sum(1, keepdims=True))
    np.testing.assert_allclose(kl, (np.exp(lp) * (lp - lq)).sum(1), rtol=1e-4, atol=1e-6)
    assert abs(kl[5]) < 1e-6 and same[5] and not same[6]
    assert same.mean() == (p.argmax(1) == q.argmax(1)).mean()
    wins = [rng.gamma(1.0, 0.05 * (1 + w), size=40) for w in range(12)]  # windows of unequal difficulty
    a = K.summary(wins, [np.ones(40, bool)] * 12)
    b = K.summary([w + 0.002 for w in wins], [np.zeros(40, bool)] * 12)
    assert a["mean"] == pytest.approx(np.concatenate(wins).mean()) and a["same_top"] == 1 and b["same_top"] == 0
    d = K.paired(b, a)
    assert d["diff"] == pytest.approx(0.002) and d["ci95"] == pytest.approx([0.002, 0.002])
    noisy = K.summary([w + rng.normal(0.002, 0.001, size=40) for w in wins], [np.ones(40, bool)] * 12)
    d = K.paired(noisy, a)
    lo, hi = d["ci95"]
    assert 0 < lo < d["diff"] < hi and abs(d["diff"] - 0.002) < 5e-4
    assert hi - lo < 0.1 * (a["mean_ci95"][1] - a["mean_ci95"][0])
    with pytest.raises(ValueError, match="different windows"):
        K.paired(a, K.summary(wins[:3], [np.ones(40, bool)] * 3))


def test_encode_pair_moves_context_whitespace(chess_model):
    m = Model(chess_model)
    a = E.encode_pair(m, "The capital of France is ", "Paris")
    b = E.encode_pair(m, "The capital of France is", " Paris")
    assert a == b
    ctx, cont = b
    assert m.detokenize(cont) == " Paris"
    assert m.detokenize(ctx) == "The capital of France is"


def _reference_loglik(c, model, context, continuation):
    """Independent: context+continuation decoded in one batch from an empty cache, logits for every
    token, log-softmax summed at the continuation tokens."""
    ctx_toks = model.tokenize(context, add_special=False)
    cont = model.tokenize(context + continuation, add_special=False)[len(ctx_toks):]
    bos = model.tokenize("", add_special=True) if model.add_bos else []
    full = bos + ctx_toks + cont
    c.clear()
    logits = c.decode(full, logits="all").astype(np.float64)
    total = 0.0
    for j, tok in enumerate(cont):
        row = logits[len(full) - len(cont) - 1 + j]
        total += row[tok] - (row.max() + np.log(np.exp(row - row.max()).sum()))
    return total, len(full)


def _hand_items():
    yield "hand", {"context": "The capital of France is", "choices": [" Paris", " a small green frog", " London"],
                   "gold": 0}
    yield "hand", {"context": "Question: What do bees make?\nAnswer:", "choices": [" honey", " steel", " glass"],
                   "gold": 0}
    for task in ("arc_easy", "winogrande", "piqa", "openbookqa"):  # a few short real items
        recs = load_task(task)
        picked = 0
        for i in E.subsample(len(recs), 40):
            pairs, _ = E.task_requests(recs[i])
            if max(len(a) + len(b) for a, b in pairs) < 150 and picked < 2:  # ~< 40 tokens: one attention path
                picked += 1
                yield task, recs[i]


@pytest.mark.parametrize("level", ["off", "0.5"])
def test_task_scoring_matches_independent_decode(chess_model, level):
    """The scorer (shared context prefix in the KV cache, tails removed again) gives each choice the same
    log-likelihood as a full one-batch decode, and acc/acc_norm are the argmaxes.

    Items are short (< 64 tokens): ggml's CPU flash attention rounds Q to f16 in ubatches under 64
    rows and uses fp32 above, so a long item decoded in one batch differs from the prefix+tail split by
    llama.cpp's own batch-size dependence, not by the scorer (docs/results.md)."""
    m = Model(chess_model)
    with Context(m, n_ctx=512, n_batch=512, n_threads=1) as c, Context(m, n_ctx=512, n_threads=1) as ref:
        for x in (c, ref):
            x.chess_set("chess", level, "masked") if level != "off" else x.chess_set(level="off")
        seen = 0
        for task, rec in _hand_items():
            pairs, gold = E.task_requests(rec)
            item = E.TaskItem([E.encode_pair(m, a, b) for a, b in pairs], [E.choice_length(b) for _, b in pairs], gold)
            acc, acc_norm, lls, n_dec = E.score_item(c, item)
            want = []
            for a, b in pairs:
                ll, n = _reference_loglik(ref, m, a, b)
                assert n < W.FA_TILE_ROWS
                want.append(ll)
            np.testing.assert_allclose(lls, want, atol=1e-3, rtol=0, err_msg=f"{task} {rec}")
            assert acc == int(np.argmax(want) == gold)
            lens = [len(b[1:]) if b.startswith(" ") else len(b) for _, b in pairs]  # lm-eval: the choice, no delimiter
            assert acc_norm == int(np.argmax(np.array(want) / lens) == gold)
            # sharing: a multiple-choice context is decoded once, not once per choice
            unshared = sum(len(ct) + len(k) - 1 for ct, k in item.reqs)
            assert n_dec < unshared if task != "winogrande" else n_dec <= unshared
            if task == "hand" and level == "off":
                assert acc == 1, (rec, lls)  # "Paris", "honey"
            seen += 1
        assert seen >= 8


def test_log_softmax_and_subsample():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 1000)).astype(np.float32) * 8
    t = [3, 999, 0, 17, 500]
    x64 = x.astype(np.float64)
    want = x64[np.arange(5), t] - np.log(np.exp(x64).sum(1))
    np.testing.assert_allclose(W.log_softmax_at(x, t), want, atol=1e-5)
    a = E.subsample(1000, 7)
    assert a == E.subsample(1000, 7) and len(set(a)) == 7 and a == sorted(a)
    assert E.subsample(5, 7) == list(range(5)) and E.subsample(5, None) == list(range(5))
    assert E.choice_length(" Paris") == 5 and E.choice_length("é") == 1


def test_json_shape_and_out_dir(chess_model, short_text, tmp_path):
    out = tmp_path / "ev"
    r = run_cli("eval", chess_model, "--levels", "off,0.5", "--methods", "cats,chess", "--tasks",
                "arc_easy,winogrande", "--limit", "2", "--ppl", short_text, "--ctx", "128", "--ppl-tokens", "256",
                "--json", "--threads", "1", "--out", out, "--kld")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    rows = res["results"]
    assert [(x["method"], x["level"]) for x in rows] == [("dense", "off"), ("cats", 0.5), ("chess", 0.5)]
    for row in rows:
        assert set(row) >= {"method", "level", "ppl", "realised_sparsity", "tasks", "avg_acc"}
        assert row["ppl"] > 1
        assert set(row["tasks"]) == {"arc_easy", "winogrande"}
        for t, v in row["tasks"].items():
            assert v["n"] == 2 and v["acc"] in (0.0, 0.5, 1.0)
            assert (v["acc_norm"] is None) == (t == "winogrande")
        assert row["avg_acc"] == pytest.approx(np.mean([v["acc"] for v in row["tasks"].values()]))
    assert rows[0]["realised_sparsity"] == 0.0
    for row in rows[1:]:
        assert 0.4 < row["realised_sparsity"] < 0.6
    # weight bytes per token: bench's ideal at the realised sparsities; chess also saves on W_q/W_o
    from chess_gguf.bench import decode_bytes, read_file
    info = read_file(chess_model)
    assert rows[0]["weight_bytes_per_token"] == decode_bytes(info["tensors"])
    assert rows[0]["weight_bytes_per_token"] > rows[1]["weight_bytes_per_token"] > rows[2]["weight_bytes_per_token"]
    s = rows[1]["realised_sparsity"]
    assert rows[1]["weight_bytes_per_token"] == pytest.approx(
        decode_bytes(info["tensors"], "cats", {"ffn": s}, info["fixed"]), rel=0.01)
    assert rows[1]["realised_sparsity_parts"]["attn_q"] is None  # CATS thresholds the FFN only
    assert rows[2]["realised_sparsity_parts"]["attn_q"] > 0.3
    assert res["throughput"]["tokens_per_s"] > 0
    assert json.loads((out / "results.json").read_text())["results"] == rows
    md = (out / "results.md").read_text()
    assert "| method | level | arc_easy | winogrande | avg acc | ppl | realised sparsity | weight MB/token |" in md
    assert "±" in md and "tokens/s" in md
    assert "| method | level | text | mean KLD [95% CI] | median | p99 | same top % [95% CI] |" in md
    (pair,) = res["kld_pairs"]
    assert (pair["a"], pair["b"], pair["text"]) == ("cats 0.5", "chess 0.5", "wiki_head")
    assert pair["diff"] == pytest.approx(rows[1]["kld"] - rows[2]["kld"])
    assert "- cats 0.5 - chess 0.5 (wiki_head): " in md
    for png in [f"{k}_vs_{x}.png" for k in ("ppl", "acc", "kld") for x in ("sparsity", "bytes")]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tasks_none_and_ppl_none(chess_model, short_text):
    r = run_cli("eval", chess_model, "--levels", "off", "--tasks", "none", "--ppl", short_text, "--ctx", "128",
                "--ppl-tokens", "256", "--threads", "1", "-q")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "| method | level | ppl | realised sparsity | weight MB/token |" and lines[2].startswith("| dense | off | ")
    assert "tokens/s" in r.stdout
    r = run_cli("eval", chess_model, "--levels", "0.5", "--methods", "chess-ffn", "--ppl", "none", "--tasks",
                "boolq", "--limit", "2", "--json", "--threads", "1", "-q")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["results"]
    assert row["method"] == "chess-ffn" and row["ppl"] is None and row["tasks"]["boolq"]["acc_norm"] is None
    assert row["realised_sparsity_parts"]["attn_o"] is None and row["realised_sparsity"] > 0.4


@pytest.mark.parametrize("args,code,needle", [
    (["--tasks", "arc_easy,mmlu"], 2, "unknown task 'mmlu' (valid: " + ", ".join(TASKS)),
    (["--methods", "teal"], 2, "unknown method 'teal'"),
    (["--levels", "0.55", "--tasks", "none"], 1, "'0.55' is not a level stored"),
    (["--ppl", "none", "--tasks", "none"], 1, "nothing to evaluate"),
    (["--kld", "--levels", "0.5", "--tasks", "none"], 1, "--kld compares each sparse row with the dense row"),
])
def test_errors(chess_model, args, code, needle):
    r = run_cli("eval", chess_model, *args, "--threads", "1", "-q")
    assert r.returncode == code, r.stderr
    assert needle in r.stderr, r.stderr


@pytest.mark.parametrize("bad", ["missing.chess.gguf", "README.md"])
def test_bad_model_file(bad):
    r = run_cli("eval", bad, "--tasks", "none", "-q")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0], r.stderr


def test_several_perplexity_texts(chess_model, short_text, tmp_path):
    """--ppl A,B scores each text separately, each with its own realised sparsity; the row's ppl is A's."""
    other = tmp_path / "books_head.txt"
    from chess_gguf.data import domain_path
    other.write_text(domain_path("books").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    out = tmp_path / "ev"
    r = run_cli("eval", chess_model, "--levels", "off,0.5", "--methods", "chess-ffn", "--tasks", "none",
                "--ppl", f"{short_text},{other}", "--ctx", "128", "--ppl-tokens", "256", "--json", "--threads", "1",
                "-q", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    dense, sparse = res["results"]
    assert [t["name"] for t in res["config"]["ppl_texts"]] == ["wiki_head", "books_head"]
    for row in (dense, sparse):
        assert list(row["ppl_texts"]) == ["wiki_head", "books_head"]
        assert row["ppl"] == row["ppl_texts"]["wiki_head"]["ppl"]
        assert row["ppl_texts"]["wiki_head"]["ppl"] != row["ppl_texts"]["books_head"]["ppl"]
    for t in sparse["ppl_texts"].values():
        assert 0.35 < t["realised_sparsity"] < 0.65 and t["ppl"] > 1
    assert dense["ppl_texts"]["books_head"]["realised_sparsity"] == 0.0
    sp = [t["realised_sparsity"] for t in sparse["ppl_texts"].values()]
    assert min(sp) <= sparse["realised_sparsity"] <= max(sp)  # the row's figure combines the texts
    md = (out / "results.md").read_text()
    assert "| method | level | ppl wiki_head (sparsity) | ppl books_head (sparsity) | realised sparsity | weight MB/token |" in md
    r = run_cli("eval", chess_model, "--levels", "off", "--tasks", "none", "--ppl", "wiki,nosuchfile.txt", "-q")
    assert r.returncode == 1 and "nosuchfile.txt" in r.stderr
