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
from chess_gguf.windows import bos_tokens, led_by_bos
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
    u, v = a.hist_head, b.hist_head  # the head's input (result_norm): every token once
    assert u.sum() == v.sum() == a.n_tokens * nat_width(a, b), "hist_head"
    worst = max(worst, np.abs(u - v).sum() / u.sum())
    assert worst <= tol, worst


def nat_width(a, b):
    """n_embd: the W_q input (attn_norm) and the head input (result_norm) have the same width."""
    return int(a.layers[0].hist_q.sum() // a.n_tokens)


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
        if il == 0:  # the head's input: thresholds from its histogram against the exact quantiles
            got["head"] = (ref.head_rows, T.hist_scalar_thresholds(nat.hist_head, LEVELS), None)
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
        assert np.array_equal(runs[0].hist_head, st.hist_head)
        for x, y in zip(runs[0].layers, st.layers):
            for k in ("sum_abs_u", "sum_sq_u") + HISTS:
                assert np.array_equal(getattr(x, k), getattr(y, k)), k


@pytest.fixture
def stops(monkeypatch):
    """Records, for each native calibration, how many decodes stopped after the last layer's statistics."""
    import chess_gguf.calibrate as C
    seen = []

    class Spy(C.NativeStats):
        def release(self, il):
            if il == 0:  # calibration is over: final_layers reads and frees layer by layer
                seen.append(self.stops())
            super().release(il)

    monkeypatch.setattr(C, "NativeStats", Spy)
    return seen


def _windows(model, toks, ctx):
    return len(led_by_bos(toks, ctx, bos_tokens(model)))


def test_every_decode_stops_before_the_output_head(smol, stops):
    """The early stop (chess_calib_eval returns false after result_norm, the head's input) happens on every
    window: losing it costs 20-30% of calibration's time and no statistic, so only this test sees it."""
    toks = _tokens(smol, 1000)
    calibrate(smol, toks, ctx=256, threads=2, progress=False)
    assert stops == [_windows(smol, toks, 256)] and stops[0] > 1


def test_native_refuses_kept_rows(smol):
    with pytest.raises(ValueError, match="keep no rows"):
        calibrate(smol, _tokens(smol, 300), ctx=256, native=True, keep_rows=10, progress=False)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_every_architecture(arch, tmp_path, stops):
    """The node map of every architecture (gelu: gemma*; gate+up fused: phi3, glm4; W_q fed by the
    residual stream: olmo2) on a generated model; every decode stops after the head's input."""
    path = genmodel.generate(arch, tmp_path / f"{arch}.gguf", SHAPE, CASES[arch], seed=1)
    model = Model(path)
    toks = _tokens(model, 600)
    ref = calibrate(model, toks, ctx=128, threads=2, native=False, progress=False)
    nat = calibrate(model, toks, ctx=128, threads=2, native=True, progress=False)
    assert stops == [_windows(model, toks, 128)], arch
    model.close()
    _agree(ref, nat, 2e-3)


# --- checkpoints (#16 item 4): a run stopped after any window resumes to the same statistics ----------
FIELDS = ("sum_abs_u", "sum_sq_u", "hist_a", "hist_cats", "hist_q", "hist_o", "a", "q", "o")


def _same(x, y):
    assert x.n_tokens == y.n_tokens and x.n_rows == y.n_rows
    for il, (a, b) in enumerate(zip(x.layers, y.layers)):
        for f in FIELDS:
            u, v = getattr(a, f), getattr(b, f)
            assert (u is None) == (v is None) and (u is None or np.array_equal(u, v)), (il, f)
    assert np.array_equal(x.hist_head, y.hist_head) and x.hist_head.sum() == x.n_tokens * nat_width(x, y)


@pytest.mark.parametrize("native", [True, False])
def test_interrupted_calibration_resumes_to_the_same_statistics(smol, tmp_path, monkeypatch, native):
    from chess_gguf import calibrate as C
    toks = _tokens(smol, 1280)  # 5 windows of 256
    kw = dict(ctx=256, threads=2, progress=False, native=native, keep_rows=0 if native else 10**6)
    whole = calibrate(smol, toks, **kw)
    ck = tmp_path / "out.calib-partial"
    real, saves = C.save_checkpoint, []

    def stop_after_two(*a, **k):
        real(*a, **k)
        saves.append(a[2])
        if len(saves) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(C, "save_checkpoint", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        calibrate(smol, toks, checkpoint=ck, checkpoint_every=0, **kw)
    assert saves == [1, 2] and ck.exists()
    monkeypatch.setattr(C, "save_checkpoint", real)
    _same(calibrate(smol, toks, checkpoint=ck, checkpoint_every=0, **kw), whole)
    # complete: a third run reads it and decodes nothing
    monkeypatch.setattr(C, "Context", None)
    _same(calibrate(smol, toks, checkpoint=ck, **kw), whole)


def test_checkpoint_of_other_inputs_is_not_used(smol, tmp_path, capsys):
    ck = tmp_path / "out.calib-partial"
    toks = _tokens(smol, 600)
    calibrate(smol, toks[:300], ctx=128, threads=2, progress=False, checkpoint=ck)
    got = calibrate(smol, toks, ctx=128, threads=2, progress=False, checkpoint=ck)
    assert "made from other inputs: starting afresh" in capsys.readouterr().err
    _same(got, calibrate(smol, toks, ctx=128, threads=2, progress=False))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_is_a_clean_error(smol, tmp_path, damage):
    from chess_gguf.errors import RuntimeError_
    ck = tmp_path / "out.calib-partial"
    toks = _tokens(smol, 300)
    calibrate(smol, toks, ctx=128, threads=2, progress=False, checkpoint=ck)
    data = ck.read_bytes()
    ck.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 100, "empty": b""}[damage])
    with pytest.raises(RuntimeError_, match=f"{ck}: damaged calibration checkpoint"):
        calibrate(smol, toks, ctx=128, threads=2, progress=False, checkpoint=ck)
