"""Self-checks of the torch CHESS oracle (tests/torch_ref.py) on both bundled models."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import torch_ref as R  # noqa: E402

MODELS_DIR = Path(os.environ.get("CHESS_MODELS_DIR", Path(__file__).resolve().parents[1] / "models"))
MODELS = {
    "smollm2": MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2": MODELS_DIR / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
}
EXPECT = {  # (arch, n_layer, n_embd, n_ff, n_head * head_dim)
    "smollm2": ("llama", 30, 576, 1536, 576),
    "qwen2": ("qwen2", 24, 896, 4864, 896),
}
T = {"smollm2": 64, "qwen2": 32}  # Qwen is ~4x the compute: fewer tokens keep the suite short


def _param(name):
    return pytest.param(name, marks=pytest.mark.skipif(
        not MODELS[name].exists(), reason=f"model file absent: {MODELS[name]}"))


class Ctx:
    """Per-model state computed once: model, tokens, dense logits, stats, median thresholds."""

    def __init__(self, name):
        self.name = name
        self.model, _ = R.load_model(MODELS[name])
        vocab = self.model.config.vocab_size
        # deterministic pseudo-random ids: no tokenizer needed (callers pass llama.cpp ids)
        self.T = T[name]
        self.tokens = np.random.default_rng(0).integers(100, min(vocab, 32000), self.T).tolist()
        with torch.no_grad():
            self.dense = self.model(torch.tensor([self.tokens]), use_cache=False).logits[0].numpy()
        self.stats = R.collect_stats(self.model, self.tokens)
        self.n_layer = len(self.stats["layers"])
        act = R.activation(self.model)
        self.median = []
        for st in self.stats["layers"]:
            g = act(torch.from_numpy(st["gate"])).abs().numpy()
            med = float(np.median(g))
            self.median.append({
                "ffn_tau": np.full(g.shape[1], med, np.float32), "ffn_cats": med,
                "attn_q": float(np.median(np.abs(st["attn_norm"]))),
                "attn_o": float(np.median(np.abs(st["kqv_out"]))),
            })

    def const(self, ffn=0.0, q=0.0, o=0.0):
        n_ff = self.stats["layers"][0]["gate"].shape[1]
        return [{"ffn_tau": np.full(n_ff, ffn, np.float32), "ffn_cats": ffn, "attn_q": q,
                 "attn_o": o} for _ in range(self.n_layer)]


@pytest.fixture(scope="module", params=[_param(n) for n in MODELS])
def ctx(request):
    return Ctx(request.param)


def test_dense_matches_model(ctx):
    logits = R.forward_chess(ctx.model, ctx.tokens, None, "dense")
    assert logits.shape == ctx.dense.shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ctx.dense, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ctx.stats["logits"], ctx.dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["cats", "chess"])  # chess covers the chess-ffn path
def test_zero_thresholds_are_dense(ctx, method):
    logits, sp = R.forward_chess(ctx.model, ctx.tokens, ctx.const(), method, return_sparsity=True)
    np.testing.assert_allclose(logits, ctx.dense, rtol=0, atol=1e-5)
    assert all(max(v) == 0.0 for v in sp.values())


def _capture(model, names):
    """Record per-layer submodule outputs, or inputs for 'in:' names. Inputs are taken from a
    forward hook, which sees the args AFTER all pre-hooks (i.e. after the CHESS mask)."""
    seen, handles = {n: [] for n in names}, []
    for layer in R._layers(model):
        for n in names:
            mod = layer.get_submodule(n.removeprefix("in:"))
            take = (lambda a, out: a[0]) if n.startswith("in:") else (lambda a, out: out)
            handles.append(mod.register_forward_hook(
                lambda m, a, out, n=n, take=take: seen[n].append(take(a, out).detach().clone())))
    return seen, handles


def _run_captured(ctx, names, thresholds, method):
    seen, handles = _capture(ctx.model, names)
    try:
        logits, sp = R.forward_chess(ctx.model, ctx.tokens, thresholds, method, return_sparsity=True)
    finally:
        for h in handles:
            h.remove()
    assert all(len(v) == ctx.n_layer for v in seen.values())
    return logits, sp, seen


def test_huge_ffn_threshold_cats(ctx):
    logits, sp, seen = _run_captured(ctx, ["mlp"], ctx.const(ffn=1e30), "cats")
    assert all(float(y.abs().max()) == 0.0 for y in seen["mlp"])
    assert sp["ffn"] == [1.0] * ctx.n_layer
    assert np.abs(logits - ctx.dense).max() > 1.0


def test_huge_thresholds_chess(ctx):
    """All CHESS thresholds huge: FFN output, W_q and W_o inputs all zero; K/V inputs dense."""
    names = ["mlp", "in:self_attn.q_proj", "in:self_attn.k_proj", "in:self_attn.v_proj",
             "in:self_attn.o_proj"]
    logits, sp, seen = _run_captured(ctx, names, ctx.const(ffn=1e30, q=1e30, o=1e30), "chess")
    for part in ("ffn", "attn_q", "attn_o"):
        assert sp[part] == [1.0] * ctx.n_layer, part
    for y, q, k, v, o in zip(*(seen[n] for n in names)):
        assert float(y.abs().max()) == 0.0
        assert float(q.abs().max()) == 0.0 and float(o.abs().max()) == 0.0
        # K/V see the dense attn_norm output (a few exact zeros come from the weights)
        assert torch.equal(k, v) and (k != 0).float().mean() > 0.9
    assert np.abs(logits - ctx.dense).max() > 1.0


def test_model_restored_after_chess(ctx):
    with pytest.raises(RuntimeError):
        with R.chess_patched(ctx.model, ctx.const(ffn=1e30, q=1e30, o=1e30), "chess"):
            raise RuntimeError("boom")  # restore must also happen on errors
    with pytest.raises(ValueError):
        R.forward_chess(ctx.model, ctx.tokens, None, "teal")
    for layer in R._layers(ctx.model):
        assert "forward" not in layer.mlp.__dict__
        assert not layer.self_attn.q_proj._forward_pre_hooks
        assert not layer.self_attn.o_proj._forward_pre_hooks
    with torch.no_grad():
        logits = ctx.model(torch.tensor([ctx.tokens]), use_cache=False).logits[0].numpy()
    np.testing.assert_array_equal(logits, ctx.dense)


def test_stats_shapes_and_recompute(ctx):
    arch, n_layer, n_embd, n_ff, n_qo = EXPECT[ctx.name]
    assert ctx.model.config.model_type == arch and ctx.n_layer == n_layer
    assert R.activation_name(ctx.model) == "silu"
    shapes = {"gate": n_ff, "up": n_ff, "ffn_norm": n_embd, "attn_norm": n_embd, "kqv_out": n_qo}
    for st in ctx.stats["layers"]:
        for key, dim in shapes.items():
            assert st[key].shape == (ctx.T, dim) and st[key].dtype == np.float32, key
    assert ctx.stats["logits"].shape == (ctx.T, ctx.model.config.vocab_size)
    # gate/up are the raw projections of the captured FFN input (before the activation)
    l = n_layer // 2
    st, mlp = ctx.stats["layers"][l], R._layers(ctx.model)[l].mlp
    x = torch.from_numpy(st["ffn_norm"]).double()
    for key, lin in (("gate", mlp.gate_proj), ("up", mlp.up_proj)):
        ref = x @ lin.weight.double().T
        if lin.bias is not None:
            ref += lin.bias.double()
        np.testing.assert_allclose(st[key], ref.numpy(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert (st["gate"] < 0).mean() > 0.05  # really pre-activation: SiLU output is >= -0.279
    assert st["gate"].min() < -0.3


@pytest.mark.parametrize("method", ["cats", "chess"])
def test_median_thresholds_give_half_sparsity(ctx, method):
    # (chess-ffn with a constant ffn_tau = the median is the cats run, so it is not repeated)
    _, sp = R.forward_chess(ctx.model, ctx.tokens, ctx.median, method, return_sparsity=True)
    parts = ["ffn"] + (["attn_q", "attn_o"] if method == "chess" else [])
    for part in parts:
        # layer 0 sees exactly the calibration input; later layers drift a little, since the
        # masks upstream change their input
        assert abs(sp[part][0] - 0.5) <= 0.01, (part, sp[part][0])
        assert abs(np.mean(sp[part]) - 0.5) <= 0.03, (part, np.mean(sp[part]))
    assert abs(np.mean(sp["ffn"]) - 0.5) <= 0.01
    for part in {"ffn", "attn_q", "attn_o"} - set(parts):
        assert max(sp[part]) == 0.0


def test_median_threshold_isolated_layer(ctx):
    """Thresholding one middle layer alone (upstream dense) hits 0.5 there and nowhere else;
    W_q sees exactly the dense attn_norm output with |x| < t zeroed."""
    l = ctx.n_layer // 2
    m = ctx.median[l]
    cases = [("chess-ffn", "ffn", {"ffn_tau": m["ffn_tau"]}),
             ("chess", "attn_q", {"attn_q": m["attn_q"]}),
             ("chess", "attn_o", {"attn_o": m["attn_o"]})]
    for method, part, kw in cases:
        th = ctx.const()
        th[l] = {**th[l], **kw}
        names = ["in:self_attn.q_proj", "in:self_attn.k_proj"]
        _, sp, seen = _run_captured(ctx, names, th, method)
        assert abs(sp[part][l] - 0.5) <= 0.01, (method, part, sp[part][l])
        assert sum(sp[part]) == sp[part][l]
        if part == "attn_q":
            q, k = seen[names[0]][l][0], seen[names[1]][l][0]
            np.testing.assert_array_equal(k.numpy(), ctx.stats["layers"][l]["attn_norm"])
            assert torch.equal(q, torch.where(k.abs() >= m["attn_q"], k, torch.zeros(())))


def test_calibrated_chess_thresholds(ctx):
    """thresholds_from_stats: tau_i = T_l / m_i, and layer 0 hits the target sparsity."""
    th = R.thresholds_from_stats(ctx.stats, 0.5)
    st = ctx.stats["layers"][0]
    m = np.abs(st["up"].astype(np.float64)).mean(0)
    np.testing.assert_allclose(th[0]["ffn_tau"] * m, np.full_like(m, th[0]["ffn_tau"][0] * m[0]), rtol=1e-5)
    assert th[0]["ffn_cats"] == pytest.approx(ctx.median[0]["ffn_cats"], rel=1e-5)
    _, sp = R.forward_chess(ctx.model, ctx.tokens, th, "chess-ffn", return_sparsity=True)
    assert abs(sp["ffn"][0] - 0.5) <= 0.01
    assert np.std(np.abs(np.asarray(th[0]["ffn_tau"]))) > 0  # really per channel
