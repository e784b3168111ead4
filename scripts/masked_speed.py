"""Masked-batch speed: a CHESS file's dense prompt speed against masked batches through ggml's matmuls
(the default from 64 rows) and through the sparse kernels token by token (CHESS_MASKED_GEMM_MIN_ROWS
raised), 512-token windows with all logits as `eval --ppl` decodes them. The route is fixed when the
runtime loads, so each measurement is a child process; rounds are interleaved and medians printed.

    .venv/bin/python scripts/masked_speed.py FILE [--level 0.5] [--windows 3] [--rounds 2] [--threads 2]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

CHILD = "--child"


def child(path, level, windows, threads):
    from chess_gguf.data import default_eval_path
    from chess_gguf.runtime import Context, Model
    m = Model(path)
    toks = m.tokenize(default_eval_path().read_text()[: 512 * windows * 8])[: 512 * windows]
    with Context(m, n_ctx=512, n_batch=512, n_threads=threads) as c:
        c.chess_set(level="off") if level == "off" else c.chess_set("chess", level, "masked")
        t = time.monotonic()
        for i in range(windows):
            c.clear()
            c.decode(toks[512 * i:512 * (i + 1)], logits="all")
        print(len(toks) / (time.monotonic() - t))


def main():
    if sys.argv[1:2] == [CHILD]:
        return child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--level", default="0.5")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    rows = {"dense (off)": ("off", None), "masked, matmuls": (a.level, None),
            "masked, kernels per token": (a.level, "1000000000")}
    got = {k: [] for k in rows}
    for _ in range(a.rounds):
        for name, (level, min_rows) in rows.items():
            env = dict(os.environ)
            env.pop("CHESS_MASKED_GEMM_MIN_ROWS", None)
            if min_rows:
                env["CHESS_MASKED_GEMM_MIN_ROWS"] = min_rows
            out = subprocess.run([sys.executable, __file__, CHILD, a.file, level, str(a.windows), str(a.threads)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            got[name].append(float(out.split()[-1]))
    dense = statistics.median(got["dense (off)"])
    for name, v in got.items():
        med = statistics.median(v)
        print(f"{name:28s} {med:8.1f} tok/s  {med / dense:5.2f}x dense   rounds: {' '.join(f'{x:.1f}' for x in v)}")


if __name__ == "__main__":
    main()
