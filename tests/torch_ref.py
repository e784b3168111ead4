"""Torch reference oracle of CHESS (and CATS) for GGUF models.

transformers loads the GGUF dequantized to fp32, so this is the "ideal" dense model that the
llama.cpp runtime (quantized weights, fused kernels) is compared against. The masking rules
follow DESIGN-NOTES section 1; masks are applied to ALL tokens, as the paper evaluates.

Statistics are named after the llama.cpp graph nodes they correspond to (cb_eval names):
gate = ffn_gate-N (before the activation), up = ffn_up-N, ffn_norm = ffn_norm-N (FFN input),
attn_norm = attn_norm-N (W_q input), kqv_out = kqv_out-N (W_o input).
"""
from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch

METHODS = ("dense", "cats", "chess-ffn", "chess")
STAT_KEYS = ("gate", "up", "ffn_norm", "attn_norm", "kqv_out")


@contextlib.contextmanager
def _faster_gguf_load():
    # Load-time only: transformers rebuilds gguf's TensorNameMap once per submodule (~400x,
    # ~7 s of SmolLM2's 16 s load) and parses the GGUF metadata (the whole vocabulary) twice.
    # Both are used read-only, so memoise them while from_pretrained runs.
    import gguf

    saved = gguf.get_tensor_name_map, gguf.GGUFReader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[0])
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.get_tensor_name_map, gguf.GGUFReader = saved


@functools.lru_cache(maxsize=None)
def _load_model(gguf_path: str):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf_path))
    with _faster_gguf_load():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def _load_tokenizer(gguf_path: str):
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception:  # the tokenizer is optional: callers pass llama.cpp token ids
        return None


def load_model(gguf_path, tokenizer: bool = False):
    """-> (model, tokenizer or None). Cached per path; the tokenizer (5-10 s) only on request."""
    gguf_path = os.path.abspath(str(gguf_path))
    return _load_model(gguf_path), (_load_tokenizer(gguf_path) if tokenizer else None)


def _layers(model):
    return model.model.layers


def activation_name(model) -> str:
    """The FFN activation named by the config (hidden_act; gemma calls it hidden_activation)."""
    cfg = model.config.get_text_config()
    return getattr(cfg, "hidden_activation", None) or cfg.hidden_act


def activation(name_or_model):
    from transformers.activations import ACT2FN

    name = name_or_model if isinstance(name_or_model, str) else activation_name(name_or_model)
    return ACT2FN[name]


def _ids(tokens) -> torch.Tensor:
    return torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1, t.shape[-1]).float().numpy().copy()


@torch.no_grad()
def collect_stats(model, tokens, keys=STAT_KEYS) -> dict:
    """One causal forward pass; per layer the activations named in `keys` as float32 [T, dim].

    -> {"layers": [{key: array}], "logits": [T, vocab], "act": activation name}.
    """
    layers = [dict() for _ in _layers(model)]
    handles = []

    def out_hook(store, key):
        return lambda mod, args, out: store.__setitem__(key, _np(out))

    def in_hook(store, key):
        return lambda mod, args: store.__setitem__(key, _np(args[0]))

    try:
        for store, layer in zip(layers, _layers(model)):
            mlp, attn = layer.mlp, layer.self_attn
            hooks = {
                "gate": lambda: mlp.gate_proj.register_forward_hook(out_hook(store, "gate")),
                "up": lambda: mlp.up_proj.register_forward_hook(out_hook(store, "up")),
                "ffn_norm": lambda: mlp.register_forward_pre_hook(in_hook(store, "ffn_norm")),
                "attn_norm": lambda: attn.q_proj.register_forward_pre_hook(in_hook(store, "attn_norm")),
                "kqv_out": lambda: attn.o_proj.register_forward_pre_hook(in_hook(store, "kqv_out")),
            }
            handles += [hooks[k]() for k in keys]
        logits = model(_ids(tokens), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return {"layers": layers, "logits": _np(logits), "act": activation_name(model)}


def thresholds_from_stats(stats: dict, sparsity: float, ffn_stat: str = "mean_abs") -> list[dict]:
    """Exact-quantile calibration (pooled over all tokens x channels) of every threshold.

    ffn_stat picks the CHESS channel statistic m_i: "mean_abs" = E|u_i|, "rms" = RMS(u_i).
    Pools all tokens into one quantile (the paper's code averages per-document quantiles).
    """
    if ffn_stat not in ("mean_abs", "rms"):
        raise ValueError(f"unknown ffn_stat {ffn_stat!r}")
    act, out = activation(stats["act"]), []
    for st in stats["layers"]:
        g = np.abs(act(torch.from_numpy(st["gate"])).numpy()).astype(np.float64)
        u = st["up"].astype(np.float64)
        m = np.abs(u).mean(0) if ffn_stat == "mean_abs" else np.sqrt((u * u).mean(0))
        m = np.maximum(m, 1e-30)  # a dead channel gets an infinite threshold, i.e. always off
        t_l = np.quantile(g * m, sparsity)
        th = {"ffn_tau": (t_l / m).astype(np.float32), "ffn_cats": float(np.quantile(g, sparsity))}
        if "attn_norm" in st:
            th["attn_q"] = float(np.quantile(np.abs(st["attn_norm"]), sparsity))
        if "kqv_out" in st:
            th["attn_o"] = float(np.quantile(np.abs(st["kqv_out"]), sparsity))
        out.append(th)
    return out


@contextlib.contextmanager
def chess_patched(model, thresholds, method: str):
    """Patch the model in place for one masking method; always restored on exit.

    Yields a dict that accumulates per-layer counts (zeroed, total) for "ffn", "attn_q",
    "attn_o" over the forward passes run inside the block.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    layers = _layers(model)
    n = len(layers)
    act = activation(model)
    counts = {k: [[0, 0] for _ in range(n)] for k in ("ffn", "attn_q", "attn_o")}

    def mask(x, t, key, l):
        keep = x.abs() >= t  # keep iff |x| >= threshold (zero strictly below it)
        counts[key][l][0] += int(keep.numel() - keep.sum())
        counts[key][l][1] += keep.numel()
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype))

    def make_mlp_forward(mlp, l):
        th = thresholds[l] if thresholds is not None else None
        if method == "cats":
            t = torch.tensor(float(th["ffn_cats"]), dtype=torch.float32)
        elif method in ("chess-ffn", "chess"):
            t = torch.as_tensor(np.asarray(th["ffn_tau"], dtype=np.float32))  # broadcasts over n_ff

        def forward(x):
            g = act(mlp.gate_proj(x))
            if method != "dense":
                g = mask(g, t, "ffn", l)
            else:
                counts["ffn"][l][1] += g.numel()
            return mlp.down_proj(g * mlp.up_proj(x))

        return forward

    def pre_hook(key, t, l):
        return lambda mod, args: (mask(args[0], t, key, l), *args[1:])

    handles, patched = [], []
    try:
        for l, layer in enumerate(layers):
            mlp = layer.mlp
            patched.append(mlp)
            mlp.forward = make_mlp_forward(mlp, l)  # instance attribute shadows the class method
            if method == "chess":
                # only q_proj sees the sparse input; k_proj/v_proj are called with the dense one
                attn = layer.self_attn
                handles.append(attn.q_proj.register_forward_pre_hook(
                    pre_hook("attn_q", float(thresholds[l]["attn_q"]), l)))
                handles.append(attn.o_proj.register_forward_pre_hook(
                    pre_hook("attn_o", float(thresholds[l]["attn_o"]), l)))
        yield counts
    finally:
        for h in handles:
            h.remove()
        for mlp in patched:
            mlp.__dict__.pop("forward", None)


@torch.no_grad()
def forward_chess(model, tokens, thresholds, method: str, return_sparsity: bool = False):
    """Logits [T, vocab] (float32 numpy) with the method's masks applied to every token.

    thresholds: per layer {"ffn_tau": [n_ff], "ffn_cats": float, "attn_q": float,
    "attn_o": float} (only the keys the method needs; None for "dense").
    With return_sparsity: (logits, {"ffn"|"attn_q"|"attn_o": [zeroed fraction per layer]}).
    """
    with chess_patched(model, thresholds, method) as counts:
        logits = _np(model(_ids(tokens), use_cache=False).logits)
    if not return_sparsity:
        return logits
    frac = {k: [z / tot if tot else 0.0 for z, tot in v] for k, v in counts.items()}
    return logits, frac


@contextlib.contextmanager
def sparse_weights(model, chess_path: str):
    """Swap in the weights the sparse path really multiplies with: the CHESS file's transposed copies
    of W_down, W_q, W_o (dequantized, transposed back: x4 copies give the original weights, requantized
    ones their second rounding). With them the reference
    computes the same sparse model as the runtime, so an oracle compares like with like.

    transformers un-permutes llama's W_q rows (RoPE layout); the row order is recovered by matching
    the original GGUF rows, which transformers dequantizes bit-exactly.
    """
    from gguf import GGUFReader

    from chess_gguf.format import tensor_f32

    r = GGUFReader(str(chess_path))

    def f32(name):
        return tensor_f32(r, name)

    saved = []
    try:
        for il, layer in enumerate(_layers(model)):
            mods = {"down": layer.mlp.down_proj, "q": layer.self_attn.q_proj, "o": layer.self_attn.o_proj}
            for key, mod in mods.items():
                wt = f32(f"blk.{il}.chess_wt_{key}").T  # [n_out, n_in], GGUF row order
                if key == "q":
                    orig = f32(f"blk.{il}.attn_q.weight")
                    row_of = {orig[i].tobytes(): i for i in range(orig.shape[0])}
                    hf = mod.weight.detach().numpy()
                    perm = [row_of[hf[i].tobytes()] for i in range(hf.shape[0])]
                    wt = wt[perm]
                saved.append((mod, mod.weight.data.clone()))
                mod.weight.data = torch.from_numpy(np.ascontiguousarray(wt))
        yield model
    finally:
        for mod, w in saved:
            mod.weight.data = w
