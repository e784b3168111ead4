"""Use the patched runtime from llama-cpp-python's `Llama` class.

llama-cpp-python (installed with CMAKE_ARGS=-DLLAMA_BUILD=OFF, so it ships no library of its own)
loads libllama from the folder in LLAMA_CPP_LIB_PATH when `llama_cpp` is first imported. Point it
at our build before that import:

    from chess_gguf.interop import Llama
    llm = Llama("model.chess.gguf", n_threads=2)

or from a shell: `export LLAMA_CPP_LIB_PATH=$(python -m chess_gguf libdir)`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .runtime import find_library


def lib_dir() -> Path:
    return find_library().parent


def use_patched_runtime() -> None:
    """Set LLAMA_CPP_LIB_PATH to the patched build; must run before `import llama_cpp`."""
    want = str(lib_dir())
    if "llama_cpp" in sys.modules:
        if os.environ.get("LLAMA_CPP_LIB_PATH") != want:
            raise RuntimeError("llama_cpp was imported before chess_gguf.interop.use_patched_runtime(): "
                               f"set LLAMA_CPP_LIB_PATH={want} before importing it")
        return
    os.environ["LLAMA_CPP_LIB_PATH"] = want


def Llama(*args, **kwargs):
    """llama_cpp.Llama running on the patched libllama (CHESS-aware)."""
    use_patched_runtime()
    import llama_cpp
    kwargs.setdefault("verbose", False)
    return llama_cpp.Llama(*args, **kwargs)
