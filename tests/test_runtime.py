"""Foundation: the cffi bindings against the real patched libllama."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from chess_gguf.runtime import Context, Model, Sampler, generate, lib
from conftest import BIN, REPO

PROMPT = "The three primary colors are"


def test_struct_layouts_match_the_c_compiler(tmp_path):
    """Our cdef mirrors llama.h by hand: check every size and field offset against gcc."""
    ffi = lib().ffi
    structs = {"struct llama_model_params": None, "struct llama_context_params": None,
               "llama_batch": None, "struct ggml_tensor": None}
    lines = []
    for s in structs:
        lines.append(f'printf("{s} size %zu\\n", sizeof({s}));')
        for fname, _ in ffi.typeof(s).fields:
            lines.append(f'printf("{s} {fname} %zu\\n", offsetof({s}, {fname}));')
    src = tmp_path / "layout.c"
    src.write_text(textwrap.dedent("""
        #include <stdio.h>
        #include <stddef.h>
        #include "llama.h"
        int main(void) {
        """) + "\n".join(lines) + "\nreturn 0; }\n")
    inc = REPO / "build" / "llama.cpp"
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-std=c11", f"-I{inc / 'include'}", f"-I{inc / 'ggml' / 'include'}", str(src), "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    for line in out:
        name, field, value = line.rsplit(" ", 2)
        got = ffi.sizeof(name) if field == "size" else ffi.offsetof(name, field)
        assert got == int(value), f"{name}.{field}: cffi {got} != C {value}"


def test_greedy_generation_matches_llama_cpp_python(smol_path):
    """32 greedy tokens through our bindings == through llama-cpp-python on the same library."""
    ours_model = Model(smol_path)
    ctx = Context(ours_model, n_ctx=256, n_threads=2)
    prompt = ours_model.tokenize(PROMPT)
    ours = list(generate(ctx, prompt, 32, Sampler(temp=0)))
    assert len(ours) == 32
    code = textwrap.dedent(f"""
        import json
        from chess_gguf.interop import Llama
        llm = Llama({str(smol_path)!r}, n_ctx=256, n_threads=2, flash_attn=True)  # ours: FA auto = on for CPU
        toks = llm.tokenize({PROMPT!r}.encode(), add_bos=True)
        assert toks == {prompt!r}, toks
        out = []
        for t in llm.generate(toks, temp=0.0, top_k=1):
            if len(out) == 32: break
            out.append(int(t))
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = [int(x) for x in res.stdout.strip().splitlines()[-1].strip("[]").split(",")]
    assert ours == theirs


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "Ünïcödé: naïve café, Größe, Ελληνικά, русский, 日本語のテキスト, emoji 🎉🚀",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # comment\n",
    "numbers 3.14159 and 1,000,000; symbols <>&\"'",
])
def test_tokenize_detokenize_roundtrip(smol, text):
    toks = smol.tokenize(text, add_special=False)
    assert toks and all(0 <= t < smol.n_vocab for t in toks)
    assert smol.detokenize(toks) == text
    assert b"".join(smol.token_to_piece(t) for t in toks).decode("utf-8") == text


def test_eval_callback_sees_calibration_nodes(smol):
    seen = {}
    wanted = ("ffn_gate", "ffn_up", "attn_norm", "kqv_out")

    def wants(name):
        return name.split("-")[0] in wanted

    def on(name, arr):
        seen[name] = arr.shape

    toks = smol.tokenize("one two three four five six seven")
    n_tok = len(toks)
    with Context(smol, n_ctx=64, n_threads=2, eval_callback=(wants, on)) as ctx:
        ctx.decode(toks, logits="compute")
    n_ff = int(smol.meta("llama.feed_forward_length"))
    n_q = smol.n_embd  # SmolLM2: n_head * head_dim == n_embd
    for il in range(smol.n_layer):
        assert seen[f"ffn_gate-{il}"] == (n_tok, n_ff)
        assert seen[f"ffn_up-{il}"] == (n_tok, n_ff)
        assert seen[f"attn_norm-{il}"] == (n_tok, smol.n_embd)
        assert seen[f"kqv_out-{il}"] == (n_tok, n_q)


def test_logits_all_matches_last(smol):
    toks = smol.tokenize("A quick test of logits")
    with Context(smol, n_ctx=64, n_threads=2) as ctx:
        all_ = ctx.decode(toks, logits="all")
        ctx.clear()
        last = ctx.decode(toks, logits="last")
    assert all_.shape == (len(toks), smol.n_vocab)
    np.testing.assert_allclose(all_[-1], last, rtol=1e-4, atol=1e-4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "chess_gguf", *args], capture_output=True, text=True, cwd=REPO)


def test_bad_input_files(tmp_path, smol_path):
    missing = tmp_path / "nope.gguf"
    notgguf = tmp_path / "text.gguf"
    notgguf.write_text("this is not a model\n" * 10)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(smol_path.read_bytes()[: 3_000_000])
    for path, why in ((missing, "no such file"), (notgguf, "not a GGUF"), (trunc, "truncated")):
        r = _cli("generate", str(path), "-p", "hi", "-n", "2")
        assert r.returncode != 0
        lines = [l for l in r.stderr.strip().splitlines() if l]
        assert len(lines) == 1, r.stderr
        assert str(path) in lines[0] and why in lines[0], lines[0]
        assert "Traceback" not in r.stderr


def test_generate_cli_streams_and_reports_speed(smol_path):
    r = _cli("generate", str(smol_path), "-p", PROMPT, "-n", "8", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPT) and len(r.stdout) > len(PROMPT)
    assert "tok/s" in r.stderr and "generation: 8 tokens" in r.stderr
