"""The output head as a CHESS part (convert --head, issue #19): a threshold on |h| per level and a
Q8_0 transposed copy of the head. The runtime's logits are the masked head input times that copy
(token by token) or times the original head (masked batches), its counters count what it masked,
a threshold of 0 runs the head dense, only method chess uses it, and a broken head part is refused
by the loader and by format.check_chess with a message naming the tensor."""
import shutil

import numpy as np
import pytest
from gguf import GGUFReader

import genmodel
from chess_gguf import bench, format as fmt
from chess_gguf.data import default_eval_path
from chess_gguf.errors import RuntimeError_
from chess_gguf.gguf_io import read
from chess_gguf.runtime import Context, Model
from conftest import run_cli
from test_archs import SHAPE

LEVELS, HEAD = ("0.3", "0.5", "0.7"), (0.0, 0.4, 0.6)  # the head runs dense at 0.3


@pytest.fixture(scope="module", params=["tied", "untied"])
def head_file(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    orig = genmodel.generate("llama", root / "m.gguf", SHAPE, "q8_0", tied=request.param == "tied", seed=3)
    conv = root / "m.chess.gguf"
    r = run_cli("convert", orig, "-o", conv, "--calib-tokens", "1024", "--ctx", "128", "--levels", ",".join(LEVELS),
                "--rule", "chess", "--head", ",".join(map(str, HEAD)), "--threads", "2", "-q")
    assert r.returncode == 0, r.stderr
    return conv


def _tokens(m, n):
    return m.tokenize(default_eval_path().read_text()[: n * 8], add_special=True)[:n]


def _run(path, level, prefill, n, method="chess"):
    """(logits [n, vocab], head inputs h [n, n_embd], chess_stats) of n tokens: one by one (dense
    prefill) or as one masked batch."""
    m = Model(path)
    hs = []
    cb = (lambda name: name == "result_norm", lambda name, x: hs.append(np.array(x, dtype=np.float32)))
    try:
        with Context(m, n_ctx=256, n_batch=256, n_threads=2, eval_callback=cb) as c:
            c.chess_set(method, level, prefill)
            c.chess_stats_reset()
            toks = _tokens(m, n)
            if prefill == "masked":
                lg = c.decode(toks, logits="all")
            else:
                lg = np.stack([c.decode([t], logits="last") for t in toks])
            return lg, np.concatenate(hs), c.chess_stats()
    finally:
        m.close()


def _nmse(a, b):
    return float(np.square(a - b).sum() / np.square(b).sum())


def test_the_file_carries_a_valid_head(head_file):
    info = fmt.read_chess(head_file)
    assert set(info["head"]) == set(fmt.HEAD_TENSORS)
    thr = np.asarray(info["head"][fmt.HEAD_THR].data)
    assert thr[0] == 0 and 0 < thr[1] < thr[2]
    names = {t.name for t in info["reader"].tensors}
    w = fmt.tensor_f32(info["reader"], fmt.head_weight(names))
    assert fmt.tensor_f32(info["reader"], fmt.HEAD_WT).shape == w.T.shape


@pytest.mark.parametrize("prefill", ["dense", "masked"])
def test_sparse_head_is_the_masked_product(head_file, prefill):
    """Decoding: masked h times the transposed copy; a masked batch of >= 64 rows: masked h times the
    original head (ggml's matmul). Both are far closer to that product than to the dense head's."""
    r = read(head_file)
    names = {t.name for t in r.tensors}
    w = fmt.tensor_f32(r, fmt.HEAD_WT).T if prefill == "dense" else fmt.tensor_f32(r, fmt.head_weight(names))
    thr = float(np.asarray(fmt.read_chess(head_file)["head"][fmt.HEAD_THR].data)[2])
    lg, h, st = _run(head_file, "0.7", prefill, 80 if prefill == "masked" else 24)
    assert len(h) == len(lg)
    keep = (h != 0) & (np.abs(h) >= thr)
    want, dense = (h * keep) @ w.T, h @ w.T
    err, far = _nmse(lg, want), _nmse(dense, want)
    assert err < 1e-3 and far > 20 * err, (err, far)
    assert st["head"]["sparsity"] == pytest.approx(1 - keep.mean(), abs=1e-9)
    assert 0.4 < st["head"]["sparsity"] < 0.8


def test_zero_threshold_and_other_methods_run_the_head_dense(head_file):
    for method, level in (("chess", "0.3"), ("chess-ffn", "0.7"), ("cats", "0.5")):
        _, _, st = _run(head_file, level, "dense", 4, method)
        assert st["head"]["sparsity"] is None, (method, level)
    _, _, st = _run(head_file, "0.5", "dense", 4)
    assert st["head"]["sparsity"] is not None


def test_bytes_count_the_copy_at_its_kept_fraction(head_file):
    info = bench.read_file(str(head_file))
    t = info["tensors"]
    head = fmt.head_weight(t)
    dense = bench.decode_bytes(t)
    assert dense == sum(nb for n, nb in t.items() if not fmt.is_chess_tensor(n)) - (
        t["token_embd.weight"] if head == "output.weight" else 0)
    base = bench.decode_bytes(t, "chess", {"ffn": 0.5})
    assert bench.decode_bytes(t, "chess", {"ffn": 0.5, "head": [0.0]}) == base  # dense head: the original
    got = bench.decode_bytes(t, "chess", {"ffn": 0.5, "head": [0.25]})
    assert got == pytest.approx(base - t[head] + 0.75 * t[fmt.HEAD_WT])
    assert bench.decode_bytes(t, "chess-ffn", {"ffn": 0.5, "head": [0.25]}) == bench.decode_bytes(t, "chess-ffn", {"ffn": 0.5})


def _renamed(src, dst, old: bytes, new: bytes):
    shutil.copy(src, dst)
    data = bytearray(dst.read_bytes())
    i = data.index(old)
    data[i:i + len(new)] = new
    dst.write_bytes(bytes(data))


def test_broken_head_is_refused(head_file, tmp_path):
    # one of the pair missing (renamed to a tensor no one knows)
    bad = tmp_path / "incomplete.gguf"
    _renamed(head_file, bad, b"output.chess_wt", b"output.chess_wX")
    with pytest.raises(ValueError, match="unknown CHESS tensor"):
        fmt.read_chess(bad)
    with pytest.raises(RuntimeError_, match=r"incomplete CHESS head"):
        Model(bad)
    # a NaN threshold
    nan = tmp_path / "nan.gguf"
    shutil.copy(head_file, nan)
    r = GGUFReader(str(nan), "r+")
    next(t for t in r.tensors if t.name == fmt.HEAD_THR).data[1] = np.nan
    r.data.flush()
    del r
    with pytest.raises(ValueError, match=r"output.chess_thr: invalid threshold nan at level 1"):
        fmt.read_chess(nan)
    with pytest.raises(RuntimeError_, match=r"output.chess_thr: threshold level 1 is nan"):
        Model(nan)


def test_head_sparsity_options_are_checked(tmp_path, smol_path):
    for arg, msg in (("0.2,0.3", "2 sparsities for 3 levels"), ("1.0", "in [0, 1), got [1.0]"), ("x", "expected comma-separated")):
        r = run_cli("convert", smol_path, "-o", tmp_path / "o.gguf", "--levels", "0.3,0.5,0.7", "--head", arg, "-q")
        assert r.returncode != 0 and msg in r.stderr, r.stderr
        assert not (tmp_path / "o.gguf").exists()


def test_default_conversion_has_the_head(smol_path, tmp_path):
    """convert's defaults (dual layout): the head at 0.3 on every level, default level 0.4; decoding
    at the default drops about 30% of the head's input on real text. --head off: no head, default 0.5."""
    out = tmp_path / "d.chess.gguf"
    r = run_cli("convert", smol_path, "-o", out, "--calib-tokens", "2048", "--rule", "chess", "--threads", "2", "-q")
    assert r.returncode == 0, r.stderr
    info = fmt.read_chess(out)
    assert float(info["default_level"]) == pytest.approx(0.4) and set(info["head"]) == set(fmt.HEAD_TENSORS)
    assert "head" in r.stdout
    _, _, st = _run(out, "default", "dense", 32)
    assert 0.2 < st["head"]["sparsity"] < 0.45, st["head"]
    off = tmp_path / "off.chess.gguf"
    r = run_cli("convert", smol_path, "-o", off, "--calib-tokens", "1024", "--rule", "chess", "--levels", "0.4,0.5",
                "--head", "off", "--threads", "2", "-q")
    assert r.returncode == 0, r.stderr
    info = fmt.read_chess(off)
    assert float(info["default_level"]) == pytest.approx(0.5) and not info["head"]
