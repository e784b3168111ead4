"""The atomic CHESS GGUF writer (gguf-py's writer underneath).

It copies every original key and tensor byte for byte, then appends the CHESS keys and tensors
(docs/format.md). Output goes to a temporary file beside the target and is renamed into place only
when complete, so an interrupted or failed write leaves no output behind.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, GGMLQuantizationType

from .format import CHESS_PREFIX, is_chess_tensor
from .gguf_io import field_value


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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
                      *, progress: bool = True, drop: frozenset[str] | set[str] = frozenset(),
                      named: Optional[Path] = None) -> None:
    """Write reader's keys and tensors (minus any old CHESS content and the tensors named in `drop`)
    plus `kv` and `tensors`.

    tensors: (name, data, raw_dtype); raw_dtype None for float arrays, else data is uint8 bytes of shape
    [rows, bytes per row]. named: the file errors name (the output the user asked for, when `out` is
    a temporary file of the caller's).
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    arch = field_value(reader, "general.architecture")
    with sigterm_as_interrupt():
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
                if is_chess_tensor(t.name) or t.name in drop:
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
        except BaseException as e:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            if isinstance(e, OSError):  # full disk, file size limit, I/O error: one line naming the file
                raise ValueError(f"{named or out}: writing failed ({e.strerror or e}); nothing was written") from None
            raise


def patch_string(path: Path, key: str, value: str) -> bool:
    """Set a string key of a written GGUF in place, when its header still ends in the same aligned
    place (the tensor data does not move): True; else the file is left as it was: False.

    A key's value changing length shifts the rest of the header (the tensor infos, whose offsets
    are relative to the data section) by the difference; the zero padding before the data absorbs
    it unless the header would cross an alignment boundary (about 1 in 32 for one byte)."""
    r = GGUFReader(path)
    f = r.fields[key]
    if f.types != [GGUFValueType.STRING]:
        raise ValueError(f"{path}: {key}: not a string")
    start = f.offset
    end = start + sum(int(p.nbytes) for p in f.parts)
    last = r.tensors[-1].field if r.tensors else max(r.fields.values(), key=lambda x: x.offset)
    header_end = last.offset + sum(int(p.nbytes) for p in last.parts)
    data_start, align = int(r.data_offset), int(r.alignment)
    raw = value.encode("utf-8")
    head = b"".join(bytes(p) for p in f.parts[:3])  # key length, key, value type
    field = head + np.uint64(len(raw)).tobytes() + raw
    rest = bytes(r.data[end:header_end])
    new_end = start + len(field) + len(rest)
    del r
    if -(-new_end // align) * align != data_start:
        return False
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(field + rest + bytes(data_start - new_end))
    return True
