"""Stock GGUF files (no CHESS tensors) must decode exactly as with unpatched llama.cpp.

`make native-pristine` (a prerequisite of `make test`) builds the llama.cpp tagged `pristine`,
without our patches, into build/pristine-cmake with the same cmake options as the patched
build. Both builds then greedily generate from the same prompt, through llama-simple (the whole
program: tokenizer, prompt batch, decode loop, greedy sampler) and through each libllama loaded
by chess_gguf.runtime (token ids, 1 and 2 threads), and must produce identical tokens. The
patched library must stay dense on a stock model even when CHESS_LEVEL asks for a sparse level.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import BIN, QWEN, REPO, SMOL

PRISTINE_BIN = REPO / "build" / "pristine-cmake" / "bin"
N_PREDICT = 48
PROMPTS = {
    SMOL.name: "The Roman Empire was the post-Republican state of ancient Rome. It was ruled by emperors and",
    QWEN.name: "Photosynthesis is the process by which green plants use sunlight to",
}
MODELS = [pytest.param(SMOL, id="smollm2"), pytest.param(QWEN, id="qwen2.5-coder")]


@pytest.fixture(scope="module")
def pristine_bin():
    if not (PRISTINE_BIN / "llama-simple").is_file() or not (PRISTINE_BIN / "libllama.so").is_file():
        msg = f"unpatched llama.cpp not built in {PRISTINE_BIN}: run `make native-pristine`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return PRISTINE_BIN


@pytest.fixture(scope="module")
def patched_bin():
    if not (BIN / "llama-simple").is_file():
        pytest.fail(f"{BIN / 'llama-simple'} missing: run `make`")
    return BIN


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHESS_", "LLAMA_ARG_"))}
    env.update(extra)
    return env


def _need(model):
    if not model.exists():
        pytest.fail(f"{model} missing: run `make models`")
    return model


def _simple(bindir, model, **env):
    """llama-simple's stdout: the prompt's pieces, then the greedy continuation."""
    r = subprocess.run([str(bindir / "llama-simple"), "-m", str(model), "-n", str(N_PREDICT), PROMPTS[model.name]],
                       capture_output=True, env=_env(**env), timeout=600)
    assert r.returncode == 0, f"{bindir / 'llama-simple'} failed on {model.name}:\n{r.stderr.decode(errors='replace')[-3000:]}"
    return r.stdout


# Run in a fresh interpreter per library: a process can hold only one libllama.
_LIB_SCRIPT = r"""
import json, sys
from chess_gguf import runtime as rt
model_path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = rt.Model(model_path)
L = rt.lib().llama
try:
    L.llama_chess_set
    levels = m.chess_levels
    patched = True
except AttributeError:  # the unpatched library has no CHESS API
    levels, patched = None, False
out = {"lib": str(rt.lib().path), "patched": patched, "levels": levels, "tokens": {}}
prompt_toks = m.tokenize(prompt)
for t in (1, 2):
    with rt.Context(m, n_ctx=256, n_batch=64, n_threads=t) as ctx:
        s = rt.Sampler(temp=0.0)
        out["tokens"][t] = list(rt.generate(ctx, prompt_toks, n, s))
        s.close()
out["text"] = m.detokenize(out["tokens"][1])
print(json.dumps(out))
"""


def _lib_tokens(bindir, model, **env):
    r = subprocess.run([sys.executable, "-c", _LIB_SCRIPT, str(model), PROMPTS[model.name], str(N_PREDICT)],
                       capture_output=True, text=True, cwd=REPO, env=_env(CHESS_GGUF_LIB=str(bindir), **env),
                       timeout=600)
    assert r.returncode == 0, f"generation with {bindir} failed on {model.name}:\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["tokens"] = {int(k): v for k, v in out["tokens"].items()}
    return out


@pytest.mark.parametrize("model", MODELS)
def test_llama_simple_matches_pristine(model, pristine_bin, patched_bin):
    model = _need(model)
    ref = _simple(pristine_bin, model)
    prompt = PROMPTS[model.name].encode()
    assert prompt in ref and len(ref.split(prompt, 1)[1].strip()) > 20, ref  # really generated text
    assert _simple(patched_bin, model) == ref
    # no CHESS tensors: a requested level cannot make the patched build sparse
    assert _simple(patched_bin, model, CHESS_LEVEL="0.5") == ref


@pytest.mark.parametrize("model", MODELS)
def test_library_tokens_match_pristine(model, pristine_bin, patched_bin):
    model = _need(model)
    ref = _lib_tokens(pristine_bin, model)
    assert not ref["patched"], f"{ref['lib']} exports llama_chess_*: not the unpatched build"
    assert len(ref["tokens"][1]) >= N_PREDICT // 2, ref  # a real continuation, not an early end
    # CHESS_LEVEL is set: without CHESS tensors the patched library must ignore it and stay dense
    # (llama-simple above also runs the patched build without it)
    got = _lib_tokens(patched_bin, model, CHESS_LEVEL="0.5")
    assert got["patched"] and got["levels"] == [], got["lib"]
    for t in (1, 2):
        assert got["tokens"][t] == ref["tokens"][t], (
            f"{model.name}, {t} thread(s): patched {got['text']!r} vs pristine {ref['text']!r}")
