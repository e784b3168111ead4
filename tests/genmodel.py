"""Generate small (or full-size) GGUF models of a llama.cpp architecture with random quantized weights.

The files are real: the architecture's own tensor names, shapes and metadata, a real tokenizer copied
from a GGUF on disk, weights drawn at random (N(0, 1/fan_in)) and quantized by ggml's own quantizer
(runtime.quantize_rows) to the types real files use. They load in the pinned llama.cpp, convert and
decode; the text they write is noise, but every kernel, shape and code path is the real one. Used
by tests (architectures, kernels at real shapes) and for speed measurements at sizes whose real
weights are not on disk (synthetic weights of the right type and shape are fine for speed).

    python tests/genmodel.py qwen2 -o /tmp/q15.gguf --n-embd 1536 --n-ff 8960 --n-layer 28 \
        --n-head 12 --n-head-kv 2 --mix q4_k_m --tokenizer models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, GGMLQuantizationType as QT

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from chess_gguf.runtime import quantize_rows  # noqa: E402

DEFAULT_TOKENIZER = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Shape:
    n_embd: int = 256
    n_ff: int = 512
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 0          # 0: n_embd // n_head
    ctx: int = 4096
    n_expert: int = 0          # > 0: mixture-of-experts FFNs (ffn_*_exps, a router), 2 experts per token
    ffn_bias: bool = False     # biases on W_gate, W_up, W_down

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


@dataclass
class Arch:
    """What an architecture's file holds beyond the llama layout (names as llama.cpp loads them)."""
    qkv_bias: bool = False        # biases on W_q, W_k, W_v (qwen2)
    qk_norm: str = ""             # "head": RMS norms on q and k per head [head_dim]; "full": over the projection
    pre_norms: bool = True        # attn_norm / ffn_norm before the blocks (olmo2 has none)
    post_norms: bool = False      # post_attention_norm / post_ffw_norm after them
    head: str = "own"             # "own": output.weight; "tied": never one (the embedding is the head)
    fused_qkv: bool = False       # one attn_qkv tensor (phi3)
    fused_up: bool = False        # ffn_up holds gate and up, gate rows first; no ffn_gate (phi3, glm4)
    gated: bool = True            # False: up -> act -> down, no gate (starcoder2: for refusals)
    layer_norm: bool = False      # LayerNorm with biases, biases on W_o and the FFN too (starcoder2)
    extra_kv: dict = field(default_factory=dict)


ARCHS = {
    "llama": Arch(),
    "mistral3": Arch(),
    "qwen2": Arch(qkv_bias=True, extra_kv={"rope.freq_base": 1e6}),
    "qwen3": Arch(qk_norm="head", extra_kv={"rope.freq_base": 1e6}),
    "gemma": Arch(head="tied"),
    "gemma2": Arch(head="tied", post_norms=True, extra_kv={"attention.sliding_window": 64}),
    "gemma3": Arch(head="tied", qk_norm="head", post_norms=True, extra_kv={"attention.sliding_window": 64}),
    "phi3": Arch(fused_qkv=True, fused_up=True),
    "smollm3": Arch(),
    "granite": Arch(extra_kv={"logit_scale": 4.0, "residual_scale": 0.22, "embedding_scale": 12.0,
                              "attention.scale": 0.015625}),
    "olmo2": Arch(pre_norms=False, qk_norm="full", post_norms=True),
    "exaone": Arch(),
    "glm4": Arch(fused_up=True, post_norms=True),
    "starcoder2": Arch(qkv_bias=True, gated=False, layer_norm=True),  # no gate: convert refuses it
}

# Type of each weight kind per mix. q4_k_m follows llama-quantize's Q4_K_M: Q6_K output head, Q6_K
# ffn_down and attn_v in the "more bits" layers (first and last eighth, every third between), Q4_K
# elsewhere; rows whose length is not a multiple of 256 fall back as llama-quantize does (Q5_0 for
# Q4_K, Q8_0 for Q6_K).
MIXES = {
    "q4_k_m": {"default": QT.Q4_K, "output": QT.Q6_K, "token_embd": QT.Q4_K, "more_bits": QT.Q6_K},
    "q4_0": {"default": QT.Q4_0, "output": QT.Q6_K, "token_embd": QT.Q4_0},
    "q4_1": {"default": QT.Q4_1, "output": QT.Q8_0, "token_embd": QT.Q8_0},
    "q8_0": {"default": QT.Q8_0, "output": QT.Q8_0, "token_embd": QT.Q8_0},
}
FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def more_bits(il: int, n: int) -> bool:
    return il < n // 8 or il >= 7 * n // 8 or (il - n // 8) % 3 == 2


def tensor_type(mix: dict, kind: str, il: int, n_layer: int, row: int, tied: bool = False) -> QT:
    if kind == "token_embd" and tied:  # the embedding is the head: llama-quantize gives it the head's type
        t = mix["output"]
    elif kind in ("output", "token_embd"):
        t = mix[kind]
    elif kind in ("ffn_down", "attn_v") and "more_bits" in mix and more_bits(il, n_layer):
        t = mix["more_bits"]
    else:
        t = mix["default"]
    blk = 256 if t in FALLBACK else 32
    return FALLBACK.get(t, QT.Q8_0) if row % blk else t


def tensors(arch: Arch, s: Shape, vocab: int, tied: bool):
    """(name, kind, layer, ne) for every tensor; ne in ggml order (row length first)."""
    q, kv = s.n_head * s.hd, s.n_head_kv * s.hd
    yield "token_embd.weight", "token_embd", -1, (s.n_embd, vocab)
    yield "output_norm.weight", "norm", -1, (s.n_embd,)
    if arch.layer_norm:
        yield "output_norm.bias", "bias", -1, (s.n_embd,)
    if not tied and arch.head != "tied":
        yield "output.weight", "output", -1, (s.n_embd, vocab)
    for il in range(s.n_layer):
        b = f"blk.{il}."
        if arch.pre_norms:
            yield b + "attn_norm.weight", "norm", il, (s.n_embd,)
            if arch.layer_norm:
                yield b + "attn_norm.bias", "bias", il, (s.n_embd,)
        if arch.fused_qkv:
            yield b + "attn_qkv.weight", "attn_qkv", il, (s.n_embd, q + 2 * kv)
        else:
            for n, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                yield b + n + ".weight", n, il, (s.n_embd, rows)
                if arch.qkv_bias:
                    yield b + n + ".bias", "bias", il, (rows,)
        if arch.qk_norm:
            full = arch.qk_norm == "full"
            yield b + "attn_q_norm.weight", "norm", il, (q if full else s.hd,)
            yield b + "attn_k_norm.weight", "norm", il, (kv if full else s.hd,)
        yield b + "attn_output.weight", "attn_output", il, (q, s.n_embd)
        if arch.layer_norm:
            yield b + "attn_output.bias", "bias", il, (s.n_embd,)
        if arch.post_norms:
            yield b + "post_attention_norm.weight", "norm", il, (s.n_embd,)
        if arch.pre_norms:
            yield b + "ffn_norm.weight", "norm", il, (s.n_embd,)
            if arch.layer_norm:
                yield b + "ffn_norm.bias", "bias", il, (s.n_embd,)
        if s.n_expert:
            yield b + "ffn_gate_inp.weight", "router", il, (s.n_embd, s.n_expert)
            yield b + "ffn_gate_exps.weight", "ffn_gate", il, (s.n_embd, s.n_ff, s.n_expert)
            yield b + "ffn_up_exps.weight", "ffn_up", il, (s.n_embd, s.n_ff, s.n_expert)
            yield b + "ffn_down_exps.weight", "ffn_down", il, (s.n_ff, s.n_embd, s.n_expert)
        elif arch.fused_up or not arch.gated:
            yield b + "ffn_up.weight", "ffn_up", il, (s.n_embd, (2 if arch.fused_up else 1) * s.n_ff)
        else:
            yield b + "ffn_gate.weight", "ffn_gate", il, (s.n_embd, s.n_ff)
            yield b + "ffn_up.weight", "ffn_up", il, (s.n_embd, s.n_ff)
        if not s.n_expert:
            yield b + "ffn_down.weight", "ffn_down", il, (s.n_ff, s.n_embd)
        if s.ffn_bias or arch.layer_norm:
            for n, rows in (("ffn_gate", s.n_ff), ("ffn_up", s.n_ff), ("ffn_down", s.n_embd)):
                if n != "ffn_gate" or arch.gated:
                    yield b + n + ".bias", "bias", il, (rows,)
        if arch.post_norms:
            yield b + "post_ffw_norm.weight", "norm", il, (s.n_embd,)


def copy_tokenizer(w: GGUFWriter, tok: Path) -> int:
    r = GGUFReader(str(tok))
    vocab = 0
    for name, f in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
        if name == "tokenizer.ggml.tokens":
            vocab = len(f.data)
    return vocab


def generate(arch_name: str, out: Path, shape: Shape = Shape(), mix: str = "q4_k_m", tokenizer: Path = DEFAULT_TOKENIZER,
             tied: bool = False, seed: int = 0, progress: bool = False) -> Path:
    arch, m = ARCHS[arch_name], MIXES[mix]
    rng = np.random.default_rng(seed)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    w = GGUFWriter(str(tmp), arch=arch_name)
    # no architecture in the name: llama.cpp sets token attributes by model name (a "phi3" name expects
    # phi-3's special tokens in the vocabulary)
    w.add_name(f"chess_gguf generated {shape.n_layer}x{shape.n_embd}/{shape.n_ff} {mix}")
    vocab = copy_tokenizer(w, tokenizer)
    a = arch_name
    w.add_uint32(f"{a}.block_count", shape.n_layer)
    w.add_uint32(f"{a}.context_length", shape.ctx)
    w.add_uint32(f"{a}.embedding_length", shape.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", shape.n_ff)
    w.add_uint32(f"{a}.attention.head_count", shape.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", shape.n_head_kv)
    if shape.n_expert:
        w.add_uint32(f"{a}.expert_count", shape.n_expert)
        w.add_uint32(f"{a}.expert_used_count", 2)
    w.add_float32(f"{a}.attention.layer_norm_{'' if arch.layer_norm else 'rms_'}epsilon", 1e-6)
    if shape.head_dim:
        w.add_uint32(f"{a}.attention.key_length", shape.hd)
        w.add_uint32(f"{a}.attention.value_length", shape.hd)
    w.add_uint32(f"{a}.rope.dimension_count", shape.hd)
    for k, v in {"rope.freq_base": 1e4, **arch.extra_kv}.items():
        (w.add_uint32 if isinstance(v, int) else w.add_float32)(f"{a}.{k}", v)
    w.add_uint32("general.quantization_version", 2)
    specs = list(tensors(arch, shape, vocab, tied))
    for i, (name, kind, il, ne) in enumerate(specs):
        if kind == "norm":
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(ne[0])).astype(np.float32))
            continue
        if kind == "bias":
            w.add_tensor(name, (0.1 * rng.standard_normal(ne[0])).astype(np.float32))
            continue
        row, rows = ne[0], int(np.prod(ne[1:]))
        t = tensor_type(m, kind, il, shape.n_layer, row, tied or arch.head == "tied")
        x = rng.standard_normal((rows, row), dtype=np.float32)
        # N(0, 1/row): the input of every layer is O(1) per element; a tied embedding (gemma scales
        # it up by sqrt(n_embd)) smaller still, else the head echoes the input token
        x *= row ** -0.5 if not (kind == "token_embd" and (tied or arch.head == "tied")) else 1.0 / row
        data = np.frombuffer(quantize_rows(x, int(t)), dtype=np.uint8).reshape(*ne[:0:-1], -1)
        w.add_tensor(name, data, raw_shape=list(data.shape), raw_dtype=t)
        if progress:
            print(f"\r{i + 1}/{len(specs)} {name}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=sorted(ARCHS))
    ap.add_argument("-o", "--out", required=True)
    d = Shape()
    for f in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "head_dim", "ctx", "n_expert"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    ap.add_argument("--ffn-bias", action="store_true", help="biases on W_gate, W_up, W_down")
    ap.add_argument("--mix", choices=sorted(MIXES), default="q4_k_m")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="GGUF whose tokenizer is copied")
    ap.add_argument("--tied", action="store_true", help="no output.weight (the head is token_embd)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    shape = Shape(a.n_embd, a.n_ff, a.n_layer, a.n_head, a.n_head_kv, a.head_dim, a.ctx, a.n_expert, a.ffn_bias)
    generate(a.arch, Path(a.out), shape, a.mix, a.tokenizer, a.tied, a.seed, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
