"""How much calibration costs over just running the model (issue #16): interleaved rounds, one process.

    .venv/bin/python scripts/calib_speed.py MODEL [--tokens 4096] [--rounds 3] [--threads 2]

Per round, in alternating order: llama-perplexity over the same number of tokens of the calibration
text (from its "calculating perplexity" log line to the final estimate: 512-token windows with logits
for every row, four windows per batch as it runs by default; no loading or tokenizing), our own decode of calibrate's windows (no callback), the same with an eval callback that
asks for calibrate's nodes and does nothing (the cost of splitting the graph), and calibrate() with
the numpy and the native statistics. Prints medians and each one's ratio to llama-perplexity.
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chess_gguf.calibrate import calibrate  # noqa: E402
from chess_gguf.data import default_calib_path  # noqa: E402
from chess_gguf.runtime import Context, Model, lib_dir  # noqa: E402
from chess_gguf.windows import bos_tokens, led_by_bos  # noqa: E402

CTX = 512
NODES = re.compile(r"(ffn_gate|ffn_up|attn_norm|kqv_out)-\d+$")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    text = default_calib_path()
    m = Model(a.model)
    toks = m.tokenize(text.read_text(), add_special=False)[: a.tokens]
    bos = bos_tokens(m)
    windows = led_by_bos(toks, CTX, bos)
    ppl_bin = lib_dir() / "llama-perplexity"

    def perplexity() -> float:
        r = subprocess.run([str(ppl_bin), "-m", a.model, "-f", str(text), "-c", str(CTX), "--chunks", str(len(windows)),
                            "-t", str(a.threads)], capture_output=True, text=True)
        # log stamps are m.ss.mmm.uuu: from "calculating perplexity" to the final estimate
        stamp = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I (?:\w+: )?"
        t0 = re.search(stamp + "calculating perplexity", r.stderr)
        t1 = re.search(stamp + "Final estimate", r.stderr)
        if r.returncode != 0 or t0 is None or t1 is None:
            sys.exit(f"{ppl_bin}: failed (exit {r.returncode})\n{r.stderr[-2000:]}")
        sec = [int(t.group(1)) * 60 + int(t.group(2)) + int(t.group(3)) / 1e3 + int(t.group(4)) / 1e6 for t in (t0, t1)]
        return sec[1] - sec[0]

    def decode(**kw) -> None:
        with Context(m, n_ctx=CTX, n_batch=CTX, n_threads=a.threads, **kw) as c:
            for w in windows:
                c.clear()
                c.decode(bos + w, logits="compute")

    runs = {
        "llama-perplexity": perplexity,
        "decode": lambda: decode(),
        "decode + callback (no stats)": lambda: decode(eval_callback=(lambda n: bool(NODES.match(n)), lambda n, x: None)),
        "calibrate, numpy stats": lambda: calibrate(m, toks, ctx=CTX, threads=a.threads, native=False, progress=False) and None,
        "calibrate, native stats": lambda: calibrate(m, toks, ctx=CTX, threads=a.threads, native=True, progress=False) and None,
    }
    times = {k: [] for k in runs}
    for r in range(a.rounds):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            dt = runs[k]()
            times[k].append(dt if isinstance(dt, float) else time.perf_counter() - t0)
    ref = float(np.median(times["llama-perplexity"]))
    print(f"{Path(a.model).name}: {sum(len(w) for w in windows)} tokens in {len(windows)} windows of {CTX}, "
          f"{a.threads} threads, {a.rounds} rounds interleaved (median; ratio to llama-perplexity)")
    for k, v in times.items():
        med = float(np.median(v))
        print(f"  {k:30s} {med:7.2f} s  {med / ref:5.2f}x   rounds: {' '.join(f'{x:.2f}' for x in v)}")


if __name__ == "__main__":
    main()
