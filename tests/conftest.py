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
