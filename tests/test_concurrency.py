"""Concurrency (issue #7): several contexts of one loaded model decoding at the same time from
Python threads, and llama-server serving parallel clients on a CHESS model.

Both parts compare each concurrent generation with the same generation run alone; the server part
also compares with the in-process runtime, an independent path to the same tokens."""
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from chess_gguf.runtime import Context, Model, Sampler, generate
from conftest import BIN

N_GEN = 64  # tokens per thread: ~0.5-2 s of decoding, so the two threads overlap for many steps


@pytest.fixture(scope="module")
def model(smol_chess):
    m = Model(smol_chess)
    yield m
    m.close()


def _greedy(model, level, prompt, spans=None, barrier=None):
    """Greedy tokens after `prompt` on a fresh context of the shared model, and the context's count
    of tokens that went through the sparse FFN. With `spans`, the wall-clock interval of every
    one-token decode (the call into llama_decode) is appended to it."""
    with Context(model, n_ctx=256, n_threads=1) as c:
        c.chess_set(method="chess", level=level, prefill="dense")
        sampler = Sampler(temp=0)
        c.decode(model.tokenize(prompt), logits="last")
        c.chess_stats_reset()  # count the one-token (sparse) decodes only
        if barrier is not None:
            barrier.wait(timeout=120)
        out = []
        for _ in range(N_GEN):
            tok = sampler.sample(c, -1)
            out.append(tok)
            t0 = time.perf_counter()
            c.decode([tok], logits="last")
            if spans is not None:
                spans.append((t0, time.perf_counter()))
        return out, c.chess_stats()["tokens"]


def _overlap(a, b):
    """Total time during which an interval of `a` and one of `b` were both open (each list sorted,
    its intervals disjoint)."""
    total, j = 0.0, 0
    for s0, e0 in a:
        while j < len(b) and b[j][1] <= s0:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e0:
            total += max(0.0, min(e0, b[k][1]) - max(s0, b[k][0]))
            k += 1
    return total


def _run_threads(fns, timeout=300):
    """Run the callables in parallel threads; re-raise the first exception; return their results."""
    res, errs = [None] * len(fns), []

    def wrap(i):
        try:
            res[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errs.append(e)

    th = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(len(fns))]
    for t in th:
        t.start()
    for t in th:
        t.join(timeout)
    assert not any(t.is_alive() for t in th), "a decoding thread hung"
    if errs:
        raise errs[0]
    return res


@pytest.mark.parametrize("levels", [("0.3", "0.7"), ("0.7", "off"), ("0.5", "0.5")],
                         ids=["0.3+0.7", "0.7+off", "0.5+0.5"])
def test_two_contexts_one_model_in_threads(model, levels):
    """Two contexts of one model generate greedily at once from two threads, each with its own CHESS
    setting and prompt: each gives exactly the tokens it gives alone. The per-context CHESS state
    (level, masks, counters) and the kernels' thread-local scratch must not leak between contexts.

    cffi releases the GIL around every C call (documented since cffi 0.3), so the two threads really
    are inside llama_decode at the same time: the test measures it. Serialising the decode calls
    with a lock measured 0% overlap; unserialised calls overlap ~99% of the time here."""
    prompts = ("The history of Rome", "Water boils at")
    alone = [_greedy(model, lv, p) for lv, p in zip(levels, prompts)]
    for (toks, n_sparse), lv in zip(alone, levels):
        assert len(toks) == N_GEN and n_sparse == (0 if lv == "off" else N_GEN)
    if levels[0] != levels[1]:
        assert alone[0][0] != _greedy(model, levels[1], prompts[0])[0]  # the settings differ in output

    spans = ([], [])
    barrier = threading.Barrier(2)
    together = _run_threads([lambda i=i: _greedy(model, levels[i], prompts[i], spans[i], barrier) for i in range(2)])
    for i in range(2):
        assert together[i] == alone[i], f"thread {i} (level {levels[i]}) differs from its solo run"

    busy = [sum(e - s for s, e in sp) for sp in spans]
    ov = _overlap(*spans)
    print(f"levels {levels}: decode time {busy[0]:.2f}s/{busy[1]:.2f}s, both inside llama_decode {ov:.2f}s")
    assert ov > 0.25 * min(busy), f"the threads hardly overlapped ({ov:.3f}s of {min(busy):.3f}s): GIL held?"


# --- llama-server -------------------------------------------------------------------------------

SERVER = BIN / "llama-server"
N_PREDICT = 32
SERVER_PROMPTS = ("The history of Rome", "Water boils at",
                  "Once upon a time, in a small village,", "The best way to learn programming is")
ROUNDS = 2  # concurrent rounds of the 4 clients


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """llama-server on loopback for the duration of a with-block; always stopped on exit."""

    def __init__(self, model_path, log_path, prefill=None):
        self.port = _free_port()
        self.log_path = log_path
        env = dict(os.environ, CHESS_LEVEL="0.5", CHESS_METHOD="chess",
                   # llama.cpp's OpenMP barrier spins by default: on a machine with more runnable
                   # threads than cores (a busy CI box) two compute threads then ran 10-20x slower
                   # here (a preempted thread holds up the spinning one); passive waits avoid it.
                   OMP_WAIT_POLICY="passive")
        env.pop("CHESS_PREFILL", None)
        if prefill:
            env["CHESS_PREFILL"] = prefill
        self.cmd = [str(SERVER), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(self.port),
                    "--parallel", "4", "-c", "2048", "-t", "2", "--no-webui"]
        self.env = env
        self.proc = None

    def tail(self, n=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def check_alive(self):
        if self.proc.poll() is not None:
            pytest.fail(f"llama-server exited with code {self.proc.returncode}; log tail:\n{self.tail()}")

    def __enter__(self):
        self._log = open(self.log_path, "w")
        try:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while True:
                self.check_alive()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                        if r.status == 200:
                            return self
                except (urllib.error.URLError, OSError):
                    pass  # not listening yet, or 503 while the model loads
                if time.monotonic() > deadline:
                    pytest.fail(f"llama-server not ready after 120 s; log tail:\n{self.tail()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log.close()

    def __exit__(self, *exc):
        self.stop()

    def complete(self, prompt_tokens):
        """One greedy /completion request; returns (response, t_sent, t_answered)."""
        body = {"prompt": list(prompt_tokens), "n_predict": N_PREDICT, "temperature": 0,
                "samplers": ["top_k"], "top_k": 1, "seed": 1,
                # no prompt cache: a cached prompt is not re-processed, only its last token, which
                # then goes through another path (one-token sparse vs a dense batch)
                "cache_prompt": False, "return_tokens": True}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                resp = json.loads(r.read())
        except (urllib.error.URLError, OSError) as e:
            self.check_alive()
            detail = e.read().decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else ""
            pytest.fail(f"request failed: {e} {detail}; log tail:\n{self.tail()}")
        return resp, t0, time.monotonic()


def _check_response(resp):
    assert "error" not in resp, resp
    assert resp["tokens_predicted"] == N_PREDICT == len(resp["tokens"]), resp
    assert resp["stop_type"] == "limit" and not resp.get("truncated"), resp
    return resp["tokens"]


def _serve(server, ptoks):
    """Each prompt alone (one request at a time), then ROUNDS rounds of all prompts at once from
    one thread per client. Returns (solo tokens, [tokens per round])."""
    solo = [_check_response(server.complete(p)[0]) for p in ptoks]
    rounds = []
    for _ in range(ROUNDS):
        res = _run_threads([lambda p=p: server.complete(p) for p in ptoks], timeout=300)
        server.check_alive()
        # every request was in flight while every other one was: the server had 4 busy slots
        assert max(t0 for _, t0, _ in res) < min(t1 for _, _, t1 in res), "requests did not overlap"
        rounds.append([_check_response(r) for r, _, _ in res])
    return solo, rounds


def _reference(model, ptoks, level, prefill):
    """The in-process runtime's greedy tokens (one context, one sequence)."""
    out = []
    with Context(model, n_ctx=256, n_threads=1) as c:
        for p in ptoks:
            c.clear()
            c.chess_set(method="chess", level=level, prefill=prefill)
            out.append(list(generate(c, p, N_PREDICT, Sampler(temp=0))))
            assert len(out[-1]) == N_PREDICT  # no end-of-generation in the way
    return out


def _mean_nll(model, prompt, cont):
    """Mean negative log-likelihood (nats/token) of `cont` after `prompt` under the dense model."""
    with Context(model, n_ctx=256, n_threads=1) as c:
        c.chess_set(level="off")
        lg = c.decode(list(prompt) + list(cont), logits="all")[len(prompt) - 1:-1].astype(np.float64)
    lg -= lg.max(-1, keepdims=True)
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return float(-lp[np.arange(len(cont)), cont].mean())


@pytest.fixture(scope="module")
def server_ptoks(model):
    return [model.tokenize(p) for p in SERVER_PROMPTS]  # SmolLM2 adds no BOS: same as the server's


def test_server_parallel_clients_masked(model, smol_chess, server_ptoks, tmp_path):
    """llama-server, CHESS level 0.5 with CHESS_PREFILL=masked, 4 slots, 4 concurrent clients.

    Correct = bit-exact. With masked prefill every token goes through the sparse kernels with its own
    masks whether it is decoded alone or in a batch with the other slots' tokens, and llama.cpp's
    dense ops (W_gate, K, V, attention, lm_head) give bit-identical rows for batches of fewer than 64
    tokens (measured: a batch of 63 tokens equals one-by-one decoding exactly, 64 does not; here a
    batch holds at most the 4 prompts, under 40 tokens, or 4 generated tokens). So every
    client must get exactly the tokens of the same request served alone, and of the in-process
    runtime (prefill masked, one-token sparse decodes). Measured 5 runs x 2 rounds x 4 clients: all
    identical to solo and to the runtime."""
    ref = _reference(model, server_ptoks, "0.5", "masked")
    dense = _reference(model, server_ptoks, "off", "dense")
    assert sum(r != d for r, d in zip(ref, dense)) >= 2  # sparsity does show in these outputs
    with _Server(smol_chess, tmp_path / "server.log", prefill="masked") as srv:
        solo, rounds = _serve(srv, server_ptoks)
    assert solo == ref, "a request served alone differs from the runtime's generation"
    for r, got in enumerate(rounds):
        for i in range(len(server_ptoks)):
            assert got[i] == solo[i], f"round {r}, client {i}: concurrent output differs from solo"


def test_server_parallel_clients_dense_prefill(model, smol_chess, server_ptoks, tmp_path):
    """llama-server, CHESS level 0.5 with the default prefill (multi-token batches dense), 4 slots,
    4 concurrent clients.

    Correct here is weaker, by design: a decode batch holding tokens of several slots runs dense,
    and how the requests are batched depends on timing. So a request served alone (one-token
    batches: sparse) must give exactly the runtime's tokens (dense prefill, sparse decode), but a
    concurrent one is a timing-dependent mix of dense and sparse steps. Measured, 5 runs x 2 rounds:
    concurrent outputs agreed with the solo ones for only the first 0-6 tokens, and the two rounds
    were identical in 1 of 5 runs. What must hold: well-formed answers (32 tokens, no error, the
    server alive) that are as coherent as the solo ones: mean NLL under the dense model within
    1 nat/token of the solo output's. Measured: solo 0.9-1.5, concurrent 0.7-1.2, the solo tokens
    shuffled 6.7-8.2, random tokens 14-15."""
    ref = _reference(model, server_ptoks, "0.5", "dense")
    with _Server(smol_chess, tmp_path / "server.log") as srv:
        solo, rounds = _serve(srv, server_ptoks)
    assert solo == ref, "a request served alone differs from the runtime's generation"
    nll_solo = [_mean_nll(model, p, s) for p, s in zip(server_ptoks, solo)]
    for r, got in enumerate(rounds):
        nll = [_mean_nll(model, p, g) for p, g in zip(server_ptoks, got)]
        agree = [int(np.argmin(np.array(g + [-1]) == np.array(s + [-2]))) for g, s in zip(got, solo)]
        print(f"round {r}: tokens equal to solo before the first difference {agree}, "
              f"NLL concurrent {np.round(nll, 2).tolist()} vs solo {np.round(nll_solo, 2).tolist()}")
        for i in range(len(server_ptoks)):
            assert nll[i] < nll_solo[i] + 1.0, (r, i, nll, nll_solo)
