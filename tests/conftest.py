"""Shared fixtures: the development models (fetched by `make models`) and the built runtime."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = MODELS / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
BIN = REPO / "build" / "cmake" / "bin"


def _need(p: Path) -> Path:
    if not p.exists():
        pytest.fail(f"{p} missing: run `make models` (tests never skip a missing model silently)")
    return p


@pytest.fixture(scope="session")
def smol_path() -> Path:
    return _need(SMOL)


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return _need(QWEN)


@pytest.fixture(scope="session")
def smol(smol_path):
    from chess_gguf.runtime import Model
    m = Model(smol_path)
    yield m
    m.close()


def run_cli(*args, env=None, **kw):
    import os
    import subprocess
    import sys
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "chess_gguf", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=e, **kw)


def _convert(src, out, *extra):
    r = run_cli("convert", src, "-o", out, "--threads", "2", "-q", *extra)
    if r.returncode != 0:
        pytest.fail(f"convert {src} failed:\n{r.stderr}")
    return out


@pytest.fixture(scope="session")
def smol_chess(smol_path, tmp_path_factory):
    """SmolLM2 converted once per test session (16k calibration tokens, levels 0.3/0.5/0.7, the head
    dense: the tests of the layer parts and of the head study; tests/test_head.py has the head)."""
    out = tmp_path_factory.mktemp("smol") / "smol.chess.gguf"
    return _convert(smol_path, out, "--calib-tokens", "16384", "--levels", "0.3,0.5,0.7", "--head", "off")


@pytest.fixture(scope="session")
def qwen_chess(qwen_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen") / "qwen.chess.gguf"
    return _convert(qwen_path, out, "--calib-tokens", "8192", "--levels", "0.5,0.7", "--head", "off")
