"""Study: do a model's FFN masks have co-activation structure a channel order could exploit?

Per-token CHESS masks at one level on calibration text; channel orders fitted on the first half of
the tokens (by frequency, greedy nearest neighbour on Jaccard co-kept similarity, spectral), measured
on the second half as the mean run length of kept channels (random masks at keep 0.5: 2.0) and the
fraction of 4- / 16-channel groups with any channel kept. Results: docs/kernels.md (co-activation).

    .venv/bin/python scripts/coactivation.py models/SmolLM2-135M-Instruct.Q4_1.gguf [TOKENS] [LEVEL]
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chess_gguf.calibrate import calibrate  # noqa: E402
from chess_gguf.convert import compute_thresholds  # noqa: E402
from chess_gguf.data import default_calib_path  # noqa: E402
from chess_gguf.runtime import Model  # noqa: E402


def mean_run(M):
    starts = M & ~np.concatenate([np.zeros((M.shape[0], 1), bool), M[:, :-1]], 1)
    return M.sum() / max(starts.sum(), 1)


def groups_touched(M, g):
    n = M.shape[1] // g * g
    return M[:, :n].reshape(M.shape[0], -1, g).any(2).mean()


def order_greedy(M):
    X = M.astype(np.float32)
    C = X.T @ X
    f = np.diag(C).copy()
    J = C / (f[:, None] + f[None, :] - C + 1e-9)
    np.fill_diagonal(J, -1)
    used = np.zeros(len(f), bool)
    cur = int(np.argmax(f))
    order, used[cur] = [cur], True
    for _ in range(len(f) - 1):
        cur = int(np.argmax(np.where(used, -2, J[cur])))
        order.append(cur)
        used[cur] = True
    return np.array(order)


def order_spectral(M):
    X = M.astype(np.float32)
    return np.argsort(np.linalg.svd(X - X.mean(0), full_matrices=False)[2][0])


def main():
    path, ntok = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    level = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    m = Model(path)
    toks = m.tokenize(default_calib_path().read_text(), add_special=False)[:ntok]
    st = calibrate(m, toks, ctx=512, threads=2, keep_rows=ntok, progress=True)
    thr = compute_thresholds(st, [level], "mean-abs", "chess")
    for il, L in enumerate(st.layers):
        if il % max(1, len(st.layers) // 6):
            continue
        M = L.a > thr[il]["ffn_tau"][0][None, :]
        tr, te = M[: len(M) // 2], M[len(M) // 2:]
        o_f, o_g, o_s = np.argsort(-tr.mean(0)), order_greedy(tr), order_spectral(tr)
        print(f"layer {il}: keep {te.mean():.3f}; mean run: file order {mean_run(te):.2f}, frequency "
              f"{mean_run(te[:, o_f]):.2f}, greedy {mean_run(te[:, o_g]):.2f}, spectral {mean_run(te[:, o_s]):.2f}; "
              f"groups touched (4 / 16): {groups_touched(te, 4):.3f} / {groups_touched(te, 16):.3f} -> "
              f"{groups_touched(te[:, o_g], 4):.3f} / {groups_touched(te[:, o_g], 16):.3f} (greedy)", flush=True)


if __name__ == "__main__":
    main()
