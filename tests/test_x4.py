"""The exact transposed layout x4 (chess_gguf/x4.py): the copy holds the original's weights exactly,
the runtime reads it through the x4 kernel, and sparse decoding through it matches the dequantized
original (no second rounding)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from chess_gguf import format as fmt, gguf_io, writer, x4
from chess_gguf.runtime import quantize_rows


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1, QT.Q4_K])
@pytest.mark.parametrize("n_out,n_in", [(32, 256), (96, 512), (544, 768)])
def test_round_trip_equals_dequantized_original(qt, n_out, n_in):
    rng = np.random.default_rng(n_out + n_in + int(qt))
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * rng.uniform(0.1, 3, (n_out, 1)).astype(np.float32)
    raw = np.frombuffer(quantize_rows(w, int(qt)), dtype=np.uint8).reshape(n_out, -1)
    ref = dequantize(raw, qt).reshape(n_out, n_in)
    rows = x4.from_raw(raw, qt, n_out, n_in)
    assert rows.shape == (n_in // 32, x4.row_bytes(n_out)) and rows.dtype == np.uint8
    assert rows.nbytes == n_out * n_in // 32 * x4.BYTES_PER_32
    back = x4.to_float(rows, n_out, n_in)
    if qt == QT.Q4_K:  # the pairs d*sc, dmin*m are rounded to f16
        step = (ref.max(axis=1) - ref.min(axis=1)) / 15  # per row: about the 4-bit step
        assert (np.abs(back - ref).max(axis=1) < 0.02 * step).all()
    else:
        assert np.array_equal(back, ref)


def test_layout_bytes():
    """One row per 32 inputs: a (f16) | b (f16) | codes, channel by channel, ggml's nibble order."""
    n_out, n_in = 64, 64
    q = (np.arange(n_out * n_in).reshape(n_out, n_in) * 7 % 16).astype(np.uint8)
    a = np.linspace(0.5, 1.5, n_out * 2, dtype=np.float32).reshape(n_out, 2)
    b = -a
    rows = x4.pack(q, a, b)
    g, c, j = 1, 5, 37  # weight [j, 32g + c]
    assert rows[g, 2 * j:2 * j + 2].view(np.float16)[0] == np.float16(a[j, g])
    assert rows[g, 2 * n_out + 2 * j:2 * n_out + 2 * j + 2].view(np.float16)[0] == np.float16(b[j, g])
    byte = rows[g, 4 * n_out + c * n_out // 2 + (j // 32) * 16 + (j % 32) % 16]
    assert (byte >> 4 if j % 32 >= 16 else byte & 15) == q[j, 32 * g + c]


def test_refuses_other_types():
    with pytest.raises(ValueError, match="4-bit"):
        x4.codes_affine(np.zeros((32, 34), np.uint8), QT.Q8_0, 32, 32)
    assert not x4.fits(QT.Q4_1, 48, 64) and not x4.fits(QT.Q5_0, 64, 64) and x4.fits(QT.Q4_K, 64, 256)


def _recopy(src, orig, out, exact, wt_type=None):
    """src (a converted file) with its transposed copies made again from orig: x4 or wt_type."""
    from gguf import GGUFValueType as VT
    from chess_gguf.convert import transposed_tensors
    r, ro = gguf_io.read(src), gguf_io.read(orig)
    kv = {}
    for name, f in r.fields.items():
        if name.startswith("chess."):
            sub = f.types[-1] if f.types[0] == VT.ARRAY and len(f.types) > 1 else None
            kv[name] = (f.contents(), f.types[0], sub)
    thr = [(t.name, np.array(t.data, dtype=np.float32), None) for t in r.tensors if ".chess_" in t.name and ".chess_wt_" not in t.name]
    n_layer = sum(1 for t in r.tensors if t.name.endswith(".chess_ffn_tau"))
    writer.write_with_extras(ro, out, kv, thr + transposed_tensors(ro, n_layer, wt_type, False, exact=exact), progress=False)
    return out


@pytest.fixture(scope="module")
def smol_copies(smol_path, smol_chess, tmp_path_factory):
    """The session's SmolLM2 conversion (x4 copies: the default) with requantized Q4_1 copies and with
    exact f32 copies."""
    d = tmp_path_factory.mktemp("x4")
    return {"x4": smol_chess, "q4_1": _recopy(smol_chess, smol_path, d / "q4_1.gguf", False),
            "f32": _recopy(smol_chess, smol_path, d / "f32.gguf", False, QT.F32)}


def test_x4_file(smol_path, smol_copies):
    """Every copy of SmolLM2 (all Q4_1) is x4, holds exactly the original's weights, and the file is as
    large as with requantized Q4_1 copies."""
    r = gguf_io.read(smol_copies["x4"])
    info = fmt.check_chess(r, smol_copies["x4"])
    copies = [t for (il, kind), t in info["tensors"].items() if kind.startswith("chess_wt_")]
    assert len(copies) == 90 and all(t.tensor_type == QT.I8 for t in copies)
    assert smol_copies["x4"].stat().st_size == smol_copies["q4_1"].stat().st_size
    q41 = gguf_io.read(smol_copies["q4_1"])
    assert {t.tensor_type for t in q41.tensors if ".chess_wt_" in t.name} == {QT.Q4_1}
    orig = gguf_io.read(smol_path)
    for name, src in (("blk.7.chess_wt_down", "blk.7.ffn_down.weight"), ("blk.7.chess_wt_o", "blk.7.attn_output.weight")):
        assert np.array_equal(fmt.tensor_f32(r, name), fmt.tensor_f32(orig, src).T), name


def prompt_logits(path, method, level):
    from chess_gguf.runtime import Context, Model
    m = Model(path)
    try:
        with Context(m, n_ctx=64, n_batch=64, n_threads=2) as c:
            c.chess_set(method, level, "masked")
            return c.decode(m.tokenize("The history of the Roman Empire begins with the founding of the city, when"), logits="all")
    finally:
        m.close()


def test_sparse_decoding_reads_the_original_weights(smol_copies):
    """CATS and CHESS at 0.5, prompt in one batch with masks: through x4 copies the runtime computes
    what exact f32 copies give (the same weights, another summation order), unlike requantized Q4_1
    copies. Thresholds turn rounding differences into flipped channels that compound over layers and
    tokens, so the first token is compared tightly and the rest on average."""
    for method in ("cats", "chess"):
        got = {k: prompt_logits(p, method, "0.5") for k, p in smol_copies.items()}
        nmse = {k: ((got[k] - got["f32"]) ** 2).sum(1) / (got["f32"] ** 2).sum(1) for k in ("x4", "q4_1")}
        # measured: first token x4 1e-4 / 3e-6 (cats / chess), q4_1 0.019 / 0.014; mean 0.074 / 0.035 vs 0.16 / 0.32
        assert nmse["x4"][0] < 1e-3 and nmse["q4_1"][0] > 10 * nmse["x4"][0], (method, nmse)
        assert nmse["x4"].mean() < 0.5 * nmse["q4_1"].mean(), (method, nmse)


def test_copy_type_rule():
    from chess_gguf.convert import transposed_type
    # x4 is chosen elsewhere; this is the requant rule: the original's type where it fits...
    assert transposed_type(QT.Q4_K, 1536) == QT.Q4_K
    assert transposed_type(QT.Q5_0, 896) == QT.Q5_0
    # ...a fallback of at least the same bits where it does not (896 holds no 256-block)...
    assert transposed_type(QT.Q4_K, 896) == QT.Q4_1
    # ...and Q8_0 for Q5_K/Q6_K in the dual layout even where they fit (their sparse kernel is slow)
    for qt in (QT.Q5_K, QT.Q6_K):
        assert transposed_type(qt, 1536) == QT.Q8_0
        assert transposed_type(qt, 896) == QT.Q8_0
    # the compact layout keeps its small-file rule; an explicit type wins where it fits
    assert transposed_type(QT.Q6_K, 1536, layout="compact") == QT.Q6_K
    assert transposed_type(QT.Q6_K, 896, layout="compact") == QT.Q5_1
    assert transposed_type(QT.Q6_K, 1536, QT.Q6_K) == QT.Q6_K
    assert transposed_type(QT.Q6_K, 100) == QT.F16  # no block of 32 fits a row of 100
