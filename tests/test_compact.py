"""The compact layout (issue #8): `convert --layout compact` stores W_down, W_q, W_o only transposed,
under their own names, and the runtime runs every product by them from that layout.

SmolLM2 Q4_1 is converted twice with the same calibration (the session's dual `smol_chess` and a
compact file here). Every original tensor of SmolLM2 is Q4_1 or Q8_0, so the compact file's W_down,
W_q, W_o are byte for byte the dual file's transposed copies (x4, chess_gguf/x4.py): sparse decoding reads the same bytes
through the same kernels in both layouts and must give the same logits exactly. Dense products
by a compact weight take two routes (the kernel without thresholds for batches of up to
CHESS_COMPACT_IN_MAX_TOKENS = 32 tokens, a per-layer Q8_0 re-transposition and ggml's matmul above),
which must agree with each other to within the Q8_0 rounding of the re-transposed weight.
"""
import numpy as np
import pytest
from conftest import _convert
from gguf import GGMLQuantizationType as QT, GGUFReader

from chess_gguf.kld import token_kld
from chess_gguf.runtime import Context, Model

PROMPT = "The history of the Roman Empire begins with the founding of the city, when"
LAYOUT_MOVED = ("ffn_down.weight", "attn_q.weight", "attn_output.weight")
COPY_OF = {"ffn_down.weight": "chess_wt_down", "attn_q.weight": "chess_wt_q", "attn_output.weight": "chess_wt_o"}


@pytest.fixture(scope="module")
def smol_compact(smol_path, tmp_path_factory):
    """The same conversion as the session's smol_chess, in the compact layout."""
    out = tmp_path_factory.mktemp("compact") / "smol.compact.chess.gguf"
    return _convert(smol_path, out, "--calib-tokens", "16384", "--levels", "0.3,0.5,0.7", "--layout", "compact",
                    "--head", "off")


def _tensors(path):
    return {t.name: t for t in GGUFReader(path).tensors}


def test_compact_file(smol_path, smol_chess, smol_compact):
    """About the input's size; the three weights transposed in place of the copies; same thresholds."""
    size_in, size_c = smol_path.stat().st_size, smol_compact.stat().st_size
    assert size_c <= 1.03 * size_in, f"compact file {size_c} B is {size_c / size_in:.3f}x the input"
    r = GGUFReader(smol_compact)
    assert bytes(r.fields["chess.layout"].parts[-1]).decode() == "compact"
    orig, dual, comp = _tensors(smol_path), _tensors(smol_chess), _tensors(smol_compact)
    assert not [n for n in comp if ".chess_wt_" in n]
    assert set(comp) == {n for n in dual if ".chess_wt_" not in n}
    n_moved = 0
    for name, t in comp.items():
        kind = name.split(".", 2)[-1]
        if kind in LAYOUT_MOVED:
            o, copy = orig[name], dual[name.replace(kind, COPY_OF[kind])]
            n_in, n_out = (int(x) for x in o.shape)
            want = [20 * n_out, n_in // 32] if t.tensor_type == QT.I8 else [n_out, n_in]  # x4 rows, or transposed
            assert list(t.shape) == want, name
            assert t.tensor_type == copy.tensor_type and np.array_equal(t.data, copy.data), name
            n_moved += 1
        elif ".chess_" in name:
            assert np.array_equal(t.data, dual[name].data), f"{name}: thresholds differ from the dual conversion"
        else:
            assert np.array_equal(t.data, orig[name].data), f"{name}: not kept byte for byte"
    assert n_moved == 3 * 30


def _run(path, level, prefill, steps=16):
    """Prompt in one batch, then greedy single-token decoding: (prompt logits, per-step logits, tokens)."""
    m = Model(path)
    try:
        with Context(m, n_ctx=256, n_batch=64, n_threads=2) as c:
            c.chess_set("chess" if level != "off" else None, level, prefill)
            first = c.decode(m.tokenize(PROMPT), logits="last")
            rows, toks, cur = [first], [], first
            for _ in range(steps):
                toks.append(int(np.argmax(cur)))
                cur = c.decode([toks[-1]], logits="last")
                rows.append(cur)
            return np.stack(rows), toks
    finally:
        m.close()


def test_sparse_decoding_equals_dual(smol_chess, smol_compact):
    """Level 0.5, masked prefill (the prompt runs the sparse kernels too): bit-identical logits."""
    dual, t_dual = _run(smol_chess, "0.5", "masked")
    comp, t_comp = _run(smol_compact, "0.5", "masked")
    assert t_comp == t_dual
    assert np.array_equal(comp, dual), f"max |diff| {np.abs(comp - dual).max()}"


@pytest.mark.parametrize("n_batch", [3, 32, 33, 48])
def test_dense_batch_routes_agree(smol_compact, n_batch):
    """Dense (off) logits of a 48-token text decoded in batches of n_batch tokens: up to 32
    (CHESS_COMPACT_IN_MAX_TOKENS) run the kernel without thresholds, 33 and 48 the re-transposed
    Q8_0 weight (made from the x4 codes) + ggml's matmul. Against token-by-token decoding: identical for the kernel (below
    64 tokens llama.cpp's other dense ops give rows bit-identical to decoding, tests/test_soak.py);
    through the re-transposition the same argmax nearly everywhere and a small relative error."""
    m = Model(smol_compact)
    try:
        text = PROMPT + " the city grew into an empire that ruled the Mediterranean world for centuries, from" \
                        " Britain to Egypt, and its laws, roads and language shaped Europe long after its fall."
        toks = m.tokenize(text)[:48]
        assert len(toks) == 48
        out = {}
        for nb in (1, n_batch):
            with Context(m, n_ctx=64, n_batch=nb, n_threads=2) as c:
                c.chess_set(None, "off", "dense")
                out[nb] = c.decode(toks, logits="all")
    finally:
        m.close()
    ref, got = out[1], out[n_batch]
    if n_batch <= 32:
        assert np.array_equal(got, ref), f"max |diff| {np.abs(got - ref).max()}"
        return
    nmse = float(((got - ref) ** 2).sum() / (ref ** 2).sum())
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    # measured (5-token batches, when the crossover was 4): nmse 1.6e-3, argmax agreement 1.00. The re-transposed weight is
    # Q8_0 (relative rounding ~1/256 per block) and ggml's matmul quantizes the activations to Q8_0,
    # against f32 activations in the kernel; 30 layers compound it.
    assert nmse < 5e-3 and agree >= 0.9, f"nmse {nmse:.2e}, argmax agreement {agree:.2f}"


def test_masked_batch_near_dual(smol_chess, smol_compact):
    """A masked batch of >= 64 rows (CHESS_MASKED_GEMM_MIN_ROWS) in the compact layout: W_down, W_q,
    W_o multiply the masked activations through the re-transposed Q8_0 weight, where the dual file
    uses the original Q4_1 one. The thresholds amplify that rounding (dense: KL 0.0065 between the
    layouts) into flipped channels, so the sparse rows differ about as much as a batch differs from
    token-by-token decoding; what must hold is that the masks are applied (far closer to each other
    than to the dense model) and counted alike. Measured (96 evaluation tokens, level 0.5):
    KL(dual || compact) 0.13 against KL(dual || dense) 0.35 (each layout 0.13 from its own
    token-by-token decode, which is bit-identical between the layouts); realised sparsity within
    0.007 per layer."""
    from chess_gguf.data import default_eval_path
    out, stats = {}, {}
    for name, path in (("dual", smol_chess), ("compact", smol_compact)):
        m = Model(path)
        try:
            toks = m.tokenize(default_eval_path().read_text()[:2000], add_special=True)[:96]
            with Context(m, n_ctx=128, n_batch=128, n_threads=2) as c:
                if name == "dual":
                    c.chess_set(None, "off", "dense")
                    out["dense"] = c.decode(toks, logits="all")
                    c.clear()
                c.chess_set("chess", "0.5", "masked")
                c.chess_stats_reset()
                out[name] = c.decode(toks, logits="all")
                stats[name] = c.chess_stats()
        finally:
            m.close()

    def kl(p, q):
        return float(token_kld(p, q)[0].mean())

    k, k_dense = kl(out["dual"], out["compact"]), kl(out["dual"], out["dense"])
    print(f"KL(dual || compact) {k:.4f}, KL(dual || dense) {k_dense:.4f}")
    assert stats["dual"]["tokens"] == stats["compact"]["tokens"] == 96
    for part in ("ffn", "attn_q", "attn_o"):
        assert abs(stats["dual"][part]["sparsity"] - stats["compact"][part]["sparsity"]) < 0.01, part
    assert k < 0.6 * k_dense, (k, k_dense)
