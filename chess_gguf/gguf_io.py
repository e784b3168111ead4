"""GGUF reading helpers and the atomic CHESS GGUF writer (gguf-py underneath).

The writer copies every original key and tensor byte for byte, then appends the CHESS keys
and tensors (docs/format.md). Output goes to a temporary file beside the target and is renamed
into place only when complete, so an interrupted or failed write leaves no output behind.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, GGMLQuantizationType
from gguf.quants import dequantize

CHESS_PREFIX = "chess."
CHESS_TENSOR_MARK = ".chess_"


def is_chess_tensor(name: str) -> bool:
    return CHESS_TENSOR_MARK in name


def read(path: str | os.PathLike) -> GGUFReader:
    from .runtime import read_gguf  # one place decides what a broken file is (and caches the parse)
    return read_gguf(path)


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tensor_f32(reader: GGUFReader, name: str) -> np.ndarray:
    """A tensor dequantized to float32, in numpy (row-major) shape (ne1, ne0)."""
    for t in reader.tensors:
        if t.name == name:
            data = dequantize(t.data, t.tensor_type)
            return np.asarray(data, dtype=np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
    raise KeyError(f"{name}: no such tensor")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends Python without unwinding; turn it into KeyboardInterrupt so cleanup runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def write_with_extras(reader: GGUFReader, out: Path, kv: dict[str, tuple[Any, GGUFValueType, Optional[GGUFValueType]]],
                      tensors: list[tuple[str, np.ndarray, Optional[GGMLQuantizationType]]],
                      *, progress: bool = True) -> None:
    """Write reader's keys and tensors (minus any old CHESS content) plus `kv` and `tensors`.

    tensors: (name, data, raw_dtype); raw_dtype None for float arrays, else data is uint8 bytes of shape
    [rows, bytes per row].
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    arch = field_value(reader, "general.architecture")
    with _sigterm_as_interrupt():
        try:
            w = GGUFWriter(str(tmp), arch=arch)
            for name, f in reader.fields.items():
                if name.startswith("GGUF.") or name == "general.architecture" or name.startswith(CHESS_PREFIX):
                    continue
                vtype = f.types[0]
                sub = f.types[-1] if vtype == GGUFValueType.ARRAY and len(f.types) > 1 else None
                w.add_key_value(name, f.contents(), vtype, sub_type=sub)
                if name == "general.alignment":
                    w.data_alignment = int(f.contents())
            for name, (val, vtype, sub) in kv.items():
                w.add_key_value(name, val, vtype, sub_type=sub)
            for t in reader.tensors:
                if is_chess_tensor(t.name):
                    continue
                shape = [int(x) for x in reversed(t.shape)]  # numpy order
                if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                    w.add_tensor(t.name, t.data, raw_shape=shape, raw_dtype=t.tensor_type)
                else:
                    w.add_tensor(t.name, t.data, raw_shape=list(t.data.shape), raw_dtype=t.tensor_type)
            for name, data, raw_dtype in tensors:
                if raw_dtype is None:
                    w.add_tensor(name, data)
                else:
                    w.add_tensor(name, data, raw_shape=list(data.shape), raw_dtype=raw_dtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=progress)  # writes the tensor infos first
            w.close()
            os.replace(tmp, out)
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
