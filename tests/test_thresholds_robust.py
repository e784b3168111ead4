"""Threshold rules beyond the paper and the per-layer budget (chess_gguf/thresholds.py, issue #9).
Pure numpy on synthetic data: fast, no model."""
import numpy as np
import pytest

from chess_gguf import thresholds as T


def _toy(seed=0, n=4000, c=64):
    rng = np.random.default_rng(seed)
    scale_u = np.exp(rng.normal(0, 1, c)).astype(np.float32)       # per-channel |u| scale
    a = np.abs(rng.standard_t(4, (n, c))).astype(np.float32) * np.exp(rng.normal(0, 0.5, c)).astype(np.float32)
    u = (rng.normal(0, 1, (n, c)) * scale_u).astype(np.float32)
    wd = rng.normal(0, 1, (16, c)).astype(np.float32) * np.exp(rng.normal(0, 1, c)).astype(np.float32)
    return a, u, wd


def test_rule_weights():
    m = np.array([1.0, 2.0, 0.0], np.float32)
    cn = np.array([3.0, 0.5, 1.0], np.float32)
    assert np.array_equal(T.rule_weights("chess", m), m)
    assert np.array_equal(T.rule_weights("cats", m), np.ones(3, np.float32))
    assert np.allclose(T.rule_weights("wchess", m, cn), [3.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="column norms"):
        T.rule_weights("wchess", m)
    with pytest.raises(ValueError, match="unknown rule"):
        T.rule_weights("teal", m)


def test_column_norms():
    w = np.array([[3.0, 0.0], [4.0, 2.0]], np.float32)  # [n_embd=2, n_ff=2]
    assert np.allclose(T.column_norms(w), [5.0, 2.0])


def test_weighted_rule_hits_level_and_ranks_by_score():
    a, u, wd = _toy()
    w = T.rule_weights("wchess", np.abs(u).mean(0), T.column_norms(wd))
    tau = T.chess_thresholds(a, w, [0.5, 0.7])
    for k, lv in enumerate((0.5, 0.7)):
        assert T.realised_sparsity(a, tau[k]) == pytest.approx(lv, abs=0.002)
    # the kept set is exactly the top scores |a| * w
    keep = a >= tau[0][None, :]
    sc = a * w[None, :]
    assert sc[keep].min() >= sc[~keep].max() * (1 - 1e-5)
    # histogram route (what convert uses) agrees with the exact quantile within half a point
    hist = np.zeros((a.shape[1], T.HIST_BINS), np.int64)
    for i in range(a.shape[1]):
        hist[i] = np.bincount(T.hist_index(a[:, i]), minlength=T.HIST_BINS)
    tau_h = T.hist_chess_thresholds(hist, w, [0.5, 0.7])
    for k, lv in enumerate((0.5, 0.7)):
        assert T.realised_sparsity(a, tau_h[k]) == pytest.approx(lv, abs=0.005)


def test_ffn_output_error():
    a, u, wd = _toy(1, n=200)
    keep_all = np.ones_like(a, dtype=bool)
    assert T.ffn_output_error(a, u, keep_all, wd) == 0.0
    assert T.ffn_output_error(a, u, ~keep_all, wd) == pytest.approx(1.0)
    # dropping one channel: the error is that channel's share, computed independently
    keep = np.ones(a.shape[1], bool)
    keep[3] = False
    h = a * u
    e = np.outer(h[:, 3], wd[:, 3])
    y = h @ wd.T
    assert T.ffn_output_error(a, u, keep, wd) == pytest.approx((e ** 2).sum() / (y ** 2).sum(), rel=1e-4)


def test_weight_aware_rule_beats_paper_rule_on_output_error():
    """When W_down's columns differ in size, ranking channels by their output contribution must lose
    less than CHESS's |a| * E|u| at the same realised sparsity; an all-equal W_down ties."""
    a, u, wd = _toy(2)
    m = np.abs(u).mean(0)
    fit, test = slice(0, 2000), slice(2000, None)
    errs = {}
    for rule in ("chess", "wchess", "cats"):
        w = T.rule_weights(rule, m, T.column_norms(wd))
        tau = T.chess_thresholds(a[fit], w, [0.5])[0]
        keep = a[test] >= tau[None, :]
        assert T.realised_sparsity(a[test], tau) == pytest.approx(0.5, abs=0.03)
        errs[rule] = T.ffn_output_error(a[test], u[test], keep, wd)
    assert errs["wchess"] < 0.8 * errs["chess"] < 0.8 * errs["cats"]
    flat = np.ones_like(wd)
    assert np.allclose(T.rule_weights("wchess", m, T.column_norms(flat)) / T.column_norms(flat)[0], m)


def test_greedy_budget_matches_closed_form_and_mean():
    grid = np.linspace(0.0, 0.95, 96)
    k = np.array([1.0, 4.0, 0.5, 2.0])
    cost = k[:, None] * grid[None, :] ** 2           # optimum: s_l proportional to 1 / k_l
    s = T.greedy_budget(cost, grid, 0.3)
    assert s.mean() == pytest.approx(0.3, abs=1e-9)
    x = 4 * 0.3 / (1 / k).sum()
    assert np.allclose(s, x / k, atol=0.011)
    # sizes: the mean is size-weighted, and a part's bounds hold
    size = np.array([1.0, 1.0, 2.0, 4.0])
    s = T.greedy_budget(cost, grid, 0.5, size=size, lo=0.3, hi=0.7)
    assert size @ s / size.sum() == pytest.approx(0.5, abs=1e-9)
    assert np.all((s >= 0.3 - 1e-9) & (s <= 0.7 + 1e-9))
    # equal costs: every part at the target
    s = T.greedy_budget(np.tile(grid ** 2, (5, 1)), grid, 0.5)
    assert np.allclose(s, 0.5, atol=0.011) and s.mean() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        T.greedy_budget(cost, grid, 0.9, lo=0.3, hi=0.7)


def test_error_curve_matches_direct_computation():
    a, u, wd = _toy(3, n=300, c=32)
    w = np.abs(u).mean(0)
    grid = [0.2, 0.5, 0.8]
    cur = T.error_curve(a, u, w, wd, grid)
    assert np.all(np.diff(cur) > 0)
    for k, s in enumerate(grid):
        sc = a * w[None, :]
        keep = sc >= np.quantile(sc, s)
        y = (a * u) @ wd.T
        assert cur[k] / (y ** 2).sum() == pytest.approx(T.ffn_output_error(a, u, keep, wd), rel=1e-4)


def test_convert_rule_and_budget_end_to_end(smol_path, tmp_path):
    """convert --rule wchess --budget ffn-layer: keys recorded, the runtime loads the file, per-layer
    sparsities differ while their mean stays at the level."""
    from gguf import GGUFReader
    from chess_gguf.runtime import Context, Model
    from conftest import run_cli
    out = tmp_path / "w.chess.gguf"
    r = run_cli("convert", smol_path, "-o", out, "--calib-tokens", "2048", "--levels", "0.5", "--rule", "wchess",
                "--budget", "ffn-layer", "--no-attention", "--threads", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "rule wchess + per-layer budget" in r.stdout
    rd = GGUFReader(out)
    assert rd.fields["chess.rule"].contents() == "wchess"
    assert rd.fields["chess.budget"].contents() == "ffn-layer"
    with Model(out) as m, Context(m, n_ctx=512, n_threads=2) as c:
        c.chess_set("chess-ffn", 0.5, "masked")
        c.chess_stats_reset()
        toks = m.tokenize("The history of the city begins in the early middle ages, when a small market "
                          "grew around the river crossing. " * 8, add_special=True)
        c.decode(toks, logits="last")
        st = c.chess_stats()
    per_layer = np.array(st["ffn"]["per_layer"])
    assert 0.4 < st["ffn"]["sparsity"] < 0.6
    assert per_layer.max() - per_layer.min() > 0.1  # the budget moved layers apart
    r = run_cli("convert", smol_path, "-o", tmp_path / "x.gguf", "--rule", "teal", "-q")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_convert_rule_auto(smol_path, tmp_path, monkeypatch):
    """--rule auto (the default) scores chess and wchess on held-out calibration tokens through the runtime,
    keeps the lower NLL, records it in chess.rule and leaves no temporary file; with no held-out text
    it falls back to the paper's rule and says so."""
    from gguf import GGUFReader
    from chess_gguf.convert import Options, convert
    from chess_gguf.data import default_calib_path
    out = tmp_path / "a.chess.gguf"
    res = convert(str(smol_path), str(out), Options(levels=(0.5,), calib_tokens=2048, attention=False,
                                                    threads=2, progress=False))
    sc = res["rule_scores"]
    assert set(sc) == {"chess", "wchess"} and all(1.0 < v < 10.0 for v in sc.values()), sc  # NLL in nats
    assert sc["chess"] != sc["wchess"]
    assert res["rule"] == min(sc, key=sc.get) == GGUFReader(out).fields["chess.rule"].contents()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.chess.gguf"]
    # the output is written once with the first candidate's thresholds and name, the winner's patched in
    # place: with the candidates in the other order (so that one of the two runs patches), the same file
    import chess_gguf.convert as C
    monkeypatch.setattr(C, "AUTO_RULES", tuple(reversed(C.AUTO_RULES)))
    other = tmp_path / "o.chess.gguf"
    res2 = convert(str(smol_path), str(other), Options(levels=(0.5,), calib_tokens=2048, attention=False,
                                                       threads=2, progress=False))
    assert res2["rule_scores"] == sc and out.read_bytes() == other.read_bytes()
    other.unlink()
    short = tmp_path / "short.txt"
    short.write_text(default_calib_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")  # ~4.5k tokens
    res = convert(str(smol_path), str(tmp_path / "b.gguf"), Options(levels=(0.5,), calib_tokens=4096, calib_files=[str(short)],
                                                                    attention=False, threads=2, progress=False))
    assert res["rule"] == "chess" and res["rule_scores"] is None
