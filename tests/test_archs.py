"""Every supported architecture, proven on generated models (tests/genmodel.py): real tensor names,
shapes and metadata, a real tokenizer, random weights of the types real files use. Per architecture:
the file converts; level off decodes what the original decodes; the sparse path runs in every layer
(FFN, and W_q / W_o for chess); with every threshold 0 the sparse route is dense up to kernel
rounding; the realised sparsity follows the level."""
import shutil

import numpy as np
import pytest
from gguf import GGUFReader

import genmodel
from chess_gguf.data import default_eval_path
from chess_gguf.runtime import Context, Model, Sampler, generate
from conftest import run_cli

# architecture -> weight mix: every mix in use somewhere (Q4_K_M also gives Q6_K W_down / attn_v)
CASES = {
    "llama": "q4_0", "mistral3": "q8_0", "qwen2": "q4_k_m", "qwen3": "q4_k_m", "gemma": "q4_0",
    "gemma2": "q4_k_m", "gemma3": "q8_0", "smollm3": "q4_k_m", "granite": "q4_0", "exaone": "q8_0",
    "olmo2": "q4_k_m", "phi3": "q4_k_m", "glm4": "q4_0",
}
# parts that run sparse: phi3 files keep W_q inside a fused attn_qkv tensor, so its W_q stays dense
PARTS = {arch: ("ffn", "attn_o") if genmodel.ARCHS[arch].fused_qkv else ("ffn", "attn_q", "attn_o") for arch in CASES}
KINDS = {"ffn": ("chess_ffn_tau", "chess_wt_down"), "attn_q": ("chess_thr_q", "chess_wt_q"),
         "attn_o": ("chess_thr_o", "chess_wt_o")}
SHAPE = genmodel.Shape(n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=2)
LEVEL = 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """arch -> (original, converted), made on first use."""
    root, made = tmp_path_factory.mktemp("archs"), {}

    def get(arch):
        if arch not in made:
            orig = genmodel.generate(arch, root / f"{arch}.gguf", SHAPE, CASES[arch], seed=1)
            conv = root / f"{arch}.chess.gguf"
            r = run_cli("convert", orig, "-o", conv, "--calib-tokens", "1024", "--ctx", "128", "--levels", "0.3,0.5,0.7", "--rule", "chess",
                        "--threads", "2", "-q")
            assert r.returncode == 0, f"{arch}: convert failed\n{r.stderr}"
            made[arch] = (orig, conv)
        return made[arch]
    return get


def _prompt(m, n=24):
    return m.tokenize(default_eval_path().read_text()[: n * 8], add_special=True)[:n]


def _greedy(path, level=None, n=16):
    m = Model(path)
    with Context(m, n_ctx=128, n_threads=2) as c:
        if level:
            c.chess_set(level=level)
        return list(generate(c, m.tokenize("The history of Rome"), n, Sampler(temp=0)))


@pytest.mark.parametrize("arch", sorted(CASES))
def test_off_decodes_as_the_original(files, arch):
    orig, conv = files(arch)
    kinds = {t.name.split(".")[-1] for t in GGUFReader(str(conv)).tensors if ".chess_" in t.name}
    assert kinds == {"chess_ffn_cats", "chess_thr", "chess_wt"} | {k for p in PARTS[arch] for k in KINDS[p]}, kinds
    assert _greedy(orig) == _greedy(conv, "off")


@pytest.mark.parametrize("arch", sorted(CASES))
def test_sparse_path_runs_in_every_layer(files, arch):
    _, conv = files(arch)
    m = Model(conv)
    toks = _prompt(m, 200)
    with Context(m, n_ctx=256, n_batch=256, n_threads=2) as c:
        c.chess_set("chess", str(LEVEL), "dense")
        c.decode(toks[:8], logits="none")
        c.chess_stats_reset()
        for t in toks[8:24]:  # single tokens: the decode path
            c.decode([t], logits="last")
        st = c.chess_stats()
        assert st["tokens"] == 16
        for part in ("ffn", "attn_q", "attn_o"):
            ran = ~np.isnan(st[part]["per_layer"])
            assert ran.all() if part in PARTS[arch] else not ran.any(), (part, st[part]["per_layer"])
        c.clear()
        c.chess_set(prefill="masked")
        c.chess_stats_reset()
        c.decode(toks, logits="none")
        st = c.chess_stats()
    assert abs(st["ffn"]["sparsity"] - LEVEL) < 0.05, st["ffn"]["sparsity"]
    for part in PARTS[arch][1:]:
        assert abs(st[part]["sparsity"] - LEVEL) < 0.08, (part, st[part]["sparsity"])


@pytest.mark.parametrize("arch", sorted(CASES))
def test_zero_thresholds_are_dense(files, arch, tmp_path):
    """Every threshold 0 keeps every channel: the sparse kernels (transposed copies, 8-bit inputs)
    give the dense logits up to rounding, token by token."""
    _, conv = files(arch)
    zero = tmp_path / "zero.chess.gguf"
    shutil.copy(conv, zero)
    r = GGUFReader(str(zero), "r+")
    for t in r.tensors:
        if any(k in t.name for k in ("chess_ffn_tau", "chess_ffn_cats", "chess_thr_q", "chess_thr_o", "output.chess_thr")):
            t.data[...] = 0
    r.data.flush()
    del r
    def logits(path, lv):
        m = Model(path)
        with Context(m, n_ctx=128, n_threads=2) as c:
            c.chess_set("chess", lv, "dense")
            c.chess_stats_reset()
            out = np.stack([c.decode([t], logits="last") for t in _prompt(m, 24)])
            return out, c.chess_stats()

    def nmse(a, b):
        return float(np.square(a - b).sum() / np.square(a).sum())

    dense, _ = logits(zero, "off")
    kept_all, st = logits(zero, str(LEVEL))
    # nothing dropped (W_q inputs exactly 0, as a quantized embedding has, may be skipped: exact)
    assert st["ffn"]["sparsity"] == 0.0 and st["attn_o"]["sparsity"] == 0.0, st
    sparse, _ = logits(conv, "0.3")  # the contrast: what dropping 30% of the channels does
    err, drop = nmse(dense, kept_all), nmse(dense, sparse)
    assert err < 2e-3 and drop > 10 * err, (err, drop)


@pytest.mark.parametrize("arch,extra,needle", [
    ("starcoder2", {}, "architecture 'starcoder2' is not supported"),    # no gate: up -> gelu -> down
    ("llama", {"n_expert": 4}, "llama with mixture-of-experts FFNs"),    # mul_mat_id experts
    ("qwen3", {"ffn_bias": True}, "qwen3 with FFN biases"),              # the sparse route has no bias
])
def test_unsupported_models_are_refused(tmp_path, arch, extra, needle):
    shape = genmodel.Shape(**{**SHAPE.__dict__, **extra})
    src = genmodel.generate(arch, tmp_path / f"{arch}.gguf", shape, "q8_0")
    out = tmp_path / "out.chess.gguf"
    r = run_cli("convert", src, "-o", out, "--calib-tokens", "1024", "--ctx", "128", "-q")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert needle in lines[0] and str(src) in lines[0] and "supported: dense gated-FFN architectures" in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob("out*"))
