"""Convert: threshold math, runtime statistics vs torch, the written file, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader

from chess_gguf import thresholds as T
from chess_gguf.calibrate import calibrate
from chess_gguf.runtime import Model
from conftest import REPO

LEVELS = [0.3, 0.5, 0.7]


# --- threshold math against a straightforward, independent implementation -------------------
def naive_quantile(values, q):
    """Linear-interpolation quantile written out by hand (numpy's default definition)."""
    v = sorted(float(x) for x in values)
    pos = q * (len(v) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def test_threshold_math_matches_naive_formulas():
    rng = np.random.default_rng(0)
    n, c = 301, 37
    g = rng.standard_normal((n, c)).astype(np.float32) * rng.uniform(0.1, 3, c).astype(np.float32)
    u = rng.standard_normal((n, c)).astype(np.float32) * rng.uniform(0.1, 3, c).astype(np.float32)
    a = np.abs(T.act(g, "silu"))
    m = T.channel_stat(np.abs(u).sum(0), (u.astype(np.float64) ** 2).sum(0), n, "mean-abs")
    for i in range(c):
        assert m[i] == pytest.approx(sum(abs(float(x)) for x in u[:, i]) / n, rel=1e-6)
    tau = T.chess_thresholds(a, m, LEVELS)
    cats = T.scalar_thresholds(a, LEVELS)
    for k, s in enumerate(LEVELS):
        big_t = naive_quantile([a[t, i] * m[i] for t in range(n) for i in range(c)], s)
        for i in range(c):
            assert tau[k, i] == pytest.approx(big_t / m[i], rel=1e-5)
        assert cats[k] == pytest.approx(naive_quantile(a.ravel(), s), rel=1e-6)
        # the realised sparsity on the calibration samples is the level itself
        assert T.realised_sparsity(a, tau[k]) == pytest.approx(s, abs=2 / (n * c) + 1e-9)
    rms = T.channel_stat(np.abs(u).sum(0), (u.astype(np.float64) ** 2).sum(0), n, "rms")
    np.testing.assert_allclose(rms, np.sqrt((u.astype(np.float64) ** 2).mean(0)), rtol=1e-6)
    # silu written out
    np.testing.assert_allclose(T.act(g, "silu"), g * (1 / (1 + np.exp(-g.astype(np.float64)))), rtol=1e-5, atol=1e-6)


def test_zero_statistic_channel_is_never_kept():
    a = np.ones((10, 3), np.float32)
    tau = T.chess_thresholds(a, np.array([1.0, 0.0, 2.0], np.float32), [0.5])
    assert np.isinf(tau[0, 1]) and np.isfinite(tau[0, [0, 2]]).all()


@pytest.mark.parametrize("bad", [[0.0, 0.5], [0.5, 1.0], [0.6, 0.4], [0.5, 0.5], []])
def test_levels_validation(bad):
    with pytest.raises(ValueError):
        T.check_levels(bad)


# --- statistics through the runtime vs the torch reference --------------------------------
def _text_tokens(model, n):
    from chess_gguf.data import default_calib_path
    return model.tokenize(default_calib_path().read_text()[: n * 8], add_special=False)[:n]


def test_runtime_statistics_match_torch(smol_path):
    """Same tokens through llama.cpp (quantized activations in the matmuls) and torch (fp32 on the
    dequantized weights): the CHESS statistics agree to a few percent, the size of Q8 activation
    rounding, far below the spread of the statistics themselves."""
    torch_ref = pytest.importorskip("torch_ref")
    model = Model(smol_path)
    toks = _text_tokens(model, 255)
    st = calibrate(model, toks, ctx=256, threads=2, keep_rows=10**6, progress=False)
    bos = model.tokenize("", add_special=True)[:1]
    hf, _ = torch_ref.load_model(str(smol_path))
    ref = torch_ref.collect_stats(hf, bos + toks)
    for il in (0, 7, 15, 29):
        R = ref["layers"][il]
        u = R["up"][1:]
        m_ref = np.abs(u).mean(0)
        m_rt = st.layers[il].sum_abs_u / st.n_tokens
        rel = np.abs(m_rt - m_ref) / (m_ref + 1e-6)
        assert np.median(rel) < 0.03, (il, np.median(rel))
        a_ref = np.abs(T.act(R["gate"][1:], "silu"))
        a_rt = st.layers[il].a.astype(np.float32)
        for s in (0.3, 0.5, 0.7):
            assert np.quantile(a_rt, s) == pytest.approx(np.quantile(a_ref, s), rel=0.03)
            assert np.quantile(st.layers[il].q.astype(np.float32), s) == pytest.approx(
                np.quantile(np.abs(R["attn_norm"][1:]), s), rel=0.03)
            assert np.quantile(st.layers[il].o.astype(np.float32), s) == pytest.approx(
                np.quantile(np.abs(R["kqv_out"][1:]), s), rel=0.05)


def test_histogram_thresholds_within_half_a_point_of_exact(smol_path):
    """Calibration streams every token into histograms; the thresholds they give must realise the
    same sparsity as exact quantiles over all the raw rows, within 0.5 percentage points."""
    model = Model(smol_path)
    toks = _text_tokens(model, 4096)
    st = calibrate(model, toks, ctx=512, threads=2, keep_rows=10**6, progress=False)
    assert st.n_rows == st.n_tokens
    worst, where = 0.0, None
    for il, L in enumerate(st.layers):
        a = L.a.astype(np.float32)
        m = T.channel_stat(L.sum_abs_u, L.sum_sq_u, st.n_tokens, "mean-abs")
        got = {"chess": (a, T.hist_chess_thresholds(L.hist_a, m, LEVELS)),
               "cats": (a, T.hist_scalar_thresholds(L.hist_cats, LEVELS)),
               "attn_q": (L.q.astype(np.float32), T.hist_scalar_thresholds(L.hist_q, LEVELS)),
               "attn_o": (L.o.astype(np.float32), T.hist_scalar_thresholds(L.hist_o, LEVELS))}
        exact_tau = T.chess_thresholds(a, m, LEVELS)
        for k, s in enumerate(LEVELS):
            exact = T.realised_sparsity(a, exact_tau[k])  # s up to ties
            for part, (x, thr) in got.items():
                ref = exact if part == "chess" else T.realised_sparsity(x, T.scalar_thresholds(x, [s])[0])
                err = abs(T.realised_sparsity(x, thr[k]) - ref)
                if err > worst:
                    worst, where = err, (il, part, s)
            assert T.hist_fraction_below(L.hist_a, exact_tau[k]) == pytest.approx(exact, abs=0.005)
    assert worst < 0.005, (worst, where)


# --- the converted file ----------------------------------------------------------------------
def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "chess_gguf", *args], capture_output=True, text=True, cwd=REPO, **kw)


@pytest.fixture(scope="module")
def converted(smol_chess):
    return smol_chess


def test_convert_prints_summary(smol_path, tmp_path):
    r = _cli("convert", str(smol_path), "-o", str(tmp_path / "s.gguf"), "--calib-tokens", "1024", "--levels", "0.5",
             "--threads", "2", "-q", "--no-attention")
    assert r.returncode == 0, r.stderr
    assert "realised sparsity on the calibration text" in r.stdout and "+" in r.stdout
    names = {t.name for t in GGUFReader(str(tmp_path / "s.gguf")).tensors}
    assert "blk.0.chess_wt_down" in names and "blk.0.chess_wt_q" not in names and "blk.0.chess_thr_o" not in names


def test_original_tensors_and_keys_byte_identical(smol_path, converted):
    a, b = GGUFReader(str(smol_path)), GGUFReader(str(converted))
    tb = {t.name: t for t in b.tensors}
    for t in a.tensors:
        u = tb[t.name]
        assert u.tensor_type == t.tensor_type and list(u.shape) == list(t.shape)
        assert np.array_equal(np.asarray(u.data).view(np.uint8), np.asarray(t.data).view(np.uint8)), t.name
    for k, f in a.fields.items():
        if k.startswith("GGUF."):
            continue
        assert k in b.fields, k
        assert str(b.fields[k].contents()) == str(f.contents()), k
    extra = sorted({n.split(".", 2)[2] for n in tb if ".chess_" in n})
    assert extra == ["chess_ffn_cats", "chess_ffn_tau", "chess_thr_o", "chess_thr_q",
                     "chess_wt_down", "chess_wt_o", "chess_wt_q"]
    assert [float(x) for x in b.fields["chess.levels"].contents()] == pytest.approx(LEVELS)


def test_transposed_copy_is_the_transpose(smol_path, converted):
    from chess_gguf.format import tensor_f32
    a, b = GGUFReader(str(smol_path)), GGUFReader(str(converted))
    for name, src in (("blk.3.chess_wt_down", "blk.3.ffn_down.weight"), ("blk.3.chess_wt_q", "blk.3.attn_q.weight")):
        w = tensor_f32(a, src)
        wt = tensor_f32(b, name)
        assert wt.shape == w.T.shape
        err = np.linalg.norm(wt - w.T) / np.linalg.norm(w)
        assert err < 0.15, (name, err)  # one extra Q4_1 rounding


def test_converted_file_at_level_off_generates_like_the_original(smol_path, converted):
    outs = []
    for p, extra in ((smol_path, []), (converted, ["--level", "off"])):
        r = _cli("generate", str(p), "-p", "Water boils at", "-n", "12", "--threads", "2", *extra)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]


def test_realised_sparsity_on_eval_split(converted, tmp_path):
    from chess_gguf.data import default_eval_path
    text = tmp_path / "eval-head.txt"  # ~2500 tokens: masked decoding of the whole split took 150 s
    text.write_text(default_eval_path().read_text()[:10000])
    r = _cli("inspect", str(converted), "--text", str(text), "--json", "--threads", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["levels"] == pytest.approx(LEVELS)
    assert abs(res["realised_sparsity"]["0.5"]["ffn"] - 0.5) <= 0.03
    for part in ("attn_q", "attn_o", "ffn_cats"):
        assert 0.35 < res["realised_sparsity"]["0.5"][part] < 0.65


# --- bad input ---------------------------------------------------------------------------------
def _expect_clean_error(r, *needles):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def test_bad_inputs_leave_no_output(tmp_path, smol_path, converted):
    notgguf = tmp_path / "x.gguf"
    notgguf.write_text("hello")
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(smol_path.read_bytes()[:5_000_000])
    cases = [
        (["convert", str(notgguf)], ["not a GGUF"]),
        (["convert", str(trunc)], ["truncated"]),
        (["convert", str(smol_path), "-o", str(tmp_path / "nodir" / "o.gguf")], ["does not exist"]),
        (["convert", str(smol_path), "-o", str(tmp_path / "o.gguf"), "--levels", "0.5,1.2"], ["(0, 1)"]),
        (["convert", str(smol_path), "-o", str(tmp_path / "o.gguf"), "--levels", "0,0.5"], ["(0, 1)"]),
        (["convert", str(converted), "-o", str(tmp_path / "o.gguf")], ["already a CHESS file"]),
        (["convert", str(smol_path), "-o", str(smol_path)], ["overwrite the input"]),
    ]
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if not os.access(ro, os.W_OK):  # root ignores permission bits
        cases.append((["convert", str(smol_path), "-o", str(ro / "o.gguf")], ["not writable"]))
    for args, needles in cases:
        _expect_clean_error(_cli(*args), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodir"] * 0 + sorted(["ro", "t.gguf", "x.gguf"])
    assert list(ro.iterdir()) == []


def test_unsupported_architecture(tmp_path, smol_path):
    """A GGUF whose architecture has no parallel-gate FFN: rewrite SmolLM2's arch key."""
    from gguf import GGUFValueType
    from chess_gguf.writer import write_with_extras
    src = GGUFReader(str(smol_path))
    # keep it loadable by gguf-py only: the check happens before the model is loaded
    fake = tmp_path / "fake.gguf"
    write_with_extras(src, fake, {}, [], progress=False)
    data = bytearray(fake.read_bytes())
    i = data.find(b"llama", 0, 4096)
    data[i:i + 5] = b"mamba"
    fake.write_bytes(bytes(data))
    r = _cli("convert", str(fake), "-o", str(tmp_path / "o.gguf"))
    _expect_clean_error(r, "mamba")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("args,needle", [
    (("--calib-tokens", "10"), "--calib-tokens: expected an integer >= 1024, got '10'"),
    (("--ctx", "8"), "--ctx: expected an integer >= 64, got '8'"),
    (("--threads", "0"), "--threads: expected a positive integer, got '0'"),
    (("--threads", "two"), "--threads: expected a positive integer, got 'two'"),
    (("--calib-tokens", "2048", "--ctx", "4096"), "--calib-tokens 2048 is shorter than one --ctx 4096 window"),
])
def test_convert_refuses_meaningless_arguments(smol_path, tmp_path, args, needle):
    out = tmp_path / "s.gguf"
    r = _cli("convert", str(smol_path), "-o", str(out), "-q", *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("python -m chess_gguf convert: error:"), r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_patch_string_in_place(tmp_path, smol_path):
    """The rule choice patches chess.rule into the written file: the result is byte for byte the file
    written with that value; a value that would move the tensor data is refused, the file untouched."""
    from gguf import GGUFValueType as VT
    from chess_gguf.writer import patch_string, write_with_extras
    src = GGUFReader(str(smol_path))
    kv = lambda v: {"chess.stat": ("mean-abs", VT.STRING, None), "chess.rule": (v, VT.STRING, None),  # noqa: E731
                    "chess.layout": ("dual", VT.STRING, None)}
    files = {}
    for v in ("chess", "wchess"):
        files[v] = tmp_path / f"{v}.gguf"
        write_with_extras(src, files[v], kv(v), [], progress=False)
    a = tmp_path / "a.gguf"
    done = 0
    for have, want in (("chess", "wchess"), ("wchess", "chess")):
        a.write_bytes(files[have].read_bytes())
        r = GGUFReader(str(a))
        last = r.tensors[-1].field
        header_end = last.offset + sum(int(p.nbytes) for p in last.parts)
        fits = -(-(header_end + len(want) - len(have)) // 32) * 32 == r.data_offset
        del r
        assert patch_string(a, "chess.rule", want) == fits
        if fits:
            assert a.read_bytes() == files[want].read_bytes(), (have, want)
            assert GGUFReader(str(a)).fields["chess.rule"].contents() == want
            done += 1
    assert done  # one byte more or less fits one way at least
    before = a.read_bytes()
    assert not patch_string(a, "chess.rule", "x" * 40)  # 40 more bytes cannot fit in < 32 of padding
    assert a.read_bytes() == before
