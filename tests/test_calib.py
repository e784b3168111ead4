"""Native calibration statistics (native/src/chess-calib.c) against the numpy ones (calibrate.py):
the sums are the same bits, the histograms the same counts up to values on a bin edge (the C log is
our own polynomial, numpy's is libm's), the thresholds they give realise the exact quantiles' sparsity,
and the counts do not depend on the number of threads."""
import numpy as np
import pytest

import genmodel
from chess_gguf import thresholds as T
from chess_gguf.calibrate import calibrate
from chess_gguf.data import default_calib_path
from chess_gguf.runtime import Model
from test_archs import CASES, SHAPE

LEVELS = (0.3, 0.5, 0.7)
HISTS = ("hist_a", "hist_cats", "hist_q", "hist_o")


def _tokens(model, n):
    return model.tokenize(default_calib_path().read_text()[: n * 8], add_special=False)[:n]


def _agree(a, b, tol):
    """Same sums bit for bit; per layer and histogram the same total and an L1 difference <= tol of it."""
    assert a.n_tokens == b.n_tokens and len(a.layers) == len(b.layers)
    worst = 0.0
    for il, (x, y) in enumerate(zip(a.layers, b.layers)):
        assert np.array_equal(x.sum_abs_u, y.sum_abs_u) and np.array_equal(x.sum_sq_u, y.sum_sq_u), il
        for k in HISTS:
            u, v = getattr(x, k), getattr(y, k)
            assert u.shape == v.shape and u.sum() == v.sum() > 0, (il, k)
            worst = max(worst, np.abs(u - v).sum() / u.sum())
    assert worst <= tol, worst


@pytest.fixture(scope="module")
def smol_stats(smol_path):
    """numpy (every row kept, for the exact quantiles) and native statistics of the same 4096 tokens."""
    model = Model(smol_path)
    toks = _tokens(model, 4096)
    ref = calibrate(model, toks, ctx=512, threads=2, keep_rows=10**6, progress=False)
    nat = calibrate(model, toks, ctx=512, threads=2, progress=False)  # native: the default without rows
    model.close()
    return ref, nat


def test_native_matches_numpy(smol_stats):
    ref, nat = smol_stats
    assert nat.n_rows == 0 and all(L.a is None for L in nat.layers)  # really the native path
    _agree(ref, nat, 1e-3)


def test_native_thresholds_realise_the_exact_quantiles(smol_stats):
    """As test_convert's histogram test, on the native histograms: within 0.5 points of exact."""
    ref, nat = smol_stats
    worst, where = 0.0, None
    for il, (R, L) in enumerate(zip(ref.layers, nat.layers)):
        a = R.a.astype(np.float32)
        m = T.channel_stat(L.sum_abs_u, L.sum_sq_u, nat.n_tokens, "mean-abs")
        exact = [T.realised_sparsity(a, t) for t in T.chess_thresholds(a, m, LEVELS)]
        got = {"chess": (a, T.hist_chess_thresholds(L.hist_a, m, LEVELS), exact),
               "cats": (a, T.hist_scalar_thresholds(L.hist_cats, LEVELS), None),
               "attn_q": (R.q.astype(np.float32), T.hist_scalar_thresholds(L.hist_q, LEVELS), None),
               "attn_o": (R.o.astype(np.float32), T.hist_scalar_thresholds(L.hist_o, LEVELS), None)}
        for part, (x, thr, ex) in got.items():
            for k, s in enumerate(LEVELS):
                want = ex[k] if ex else T.realised_sparsity(x, T.scalar_thresholds(x, [s])[0])
                err = abs(T.realised_sparsity(x, thr[k]) - want)
                if err > worst:
                    worst, where = err, (il, part, s)
    assert worst < 0.005, (worst, where)


def test_thread_count_does_not_change_a_count(smol_path):
    model = Model(smol_path)
    toks = _tokens(model, 1024)
    runs = [calibrate(model, toks, ctx=256, threads=2, stats_threads=n, progress=False) for n in (1, 2, 3)]
    model.close()
    for st in runs[1:]:
        for x, y in zip(runs[0].layers, st.layers):
            for k in ("sum_abs_u", "sum_sq_u") + HISTS:
                assert np.array_equal(getattr(x, k), getattr(y, k)), k


def test_native_refuses_kept_rows(smol):
    with pytest.raises(ValueError, match="keep no rows"):
        calibrate(smol, _tokens(smol, 300), ctx=256, native=True, keep_rows=10, progress=False)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_every_architecture(arch, tmp_path):
    """The node map of every architecture (gelu: gemma*; gate+up fused: phi3, glm4; W_q fed by the
    residual stream: olmo2) on a generated model."""
    path = genmodel.generate(arch, tmp_path / f"{arch}.gguf", SHAPE, CASES[arch], seed=1)
    model = Model(path)
    toks = _tokens(model, 600)
    ref = calibrate(model, toks, ctx=128, threads=2, native=False, progress=False)
    nat = calibrate(model, toks, ctx=128, threads=2, native=True, progress=False)
    model.close()
    _agree(ref, nat, 2e-3)
