"""GGUF reading: gguf-py's reader hardened for damaged files, and one checked, cached `read(path)`.

Every command reads files through `read`, so one place decides what a broken file is. The CHESS
format on top of it is chess_gguf/format.py; writing is chess_gguf/writer.py.
"""
from __future__ import annotations

import functools
import mmap
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGMLQuantizationType

from .errors import RuntimeError_

_ARRAY, _STRING = GGUFValueType.ARRAY, GGUFValueType.STRING  # enum attribute lookups are slow


class Reader(GGUFReader):
    """gguf-py's GGUFReader, hardened for damaged files and faster on large vocabularies.

    - Every read is bounds-checked: gguf-py returns short arrays past the end of the file, so a
      damaged array length made it loop for minutes over garbage.
    - Numeric arrays are read in one piece (one part, not one per element; contents() is the same).
    - Reads slice a plain ndarray view of the memmap: numpy's memmap subclass costs microseconds
      per slice, which made a 49k-token vocabulary take seconds to parse.
    - An unknown tensor type is reported with the tensor's name.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        offset, count = int(offset), int(count)
        end = offset + dt.itemsize * count
        if offset < 0 or count < 0 or end > plain.shape[0]:
            raise ValueError(f"{count} x {dt} at byte {offset} run past the end of the file ({plain.shape[0]} bytes)")
        arr = plain[offset:end].view(dt)
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != _ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        n = int(alen[0])
        try:
            itype = GGUFValueType(int(raw_itype[0]))
        except ValueError:
            raise ValueError(f"array at byte {orig_offs} has unknown element type {int(raw_itype[0])}") from None
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            vals = self._get(orig_offs + 12, nptype, n)
            return 12 + int(vals.nbytes), [raw_itype, alen, vals], [2], [_ARRAY, itype]
        # strings take >= 8 bytes each, nested arrays >= 12: refuse impossible lengths before looping
        if n * 8 > self._plain.shape[0] - orig_offs - 12:
            raise ValueError(f"array at byte {orig_offs} claims {n} elements, more than the file holds")
        if itype != _STRING or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        # the same parts as gguf-py's (length, bytes per string), without its per-element dispatch
        plain, mv, u64 = self._plain, memoryview(self._plain), np.dtype(np.uint64)
        parts, idxs, offs, size = [raw_itype, alen], [], orig_offs + 12, self._plain.shape[0]
        for _ in range(n):
            end = offs + 8 + int.from_bytes(mv[offs:offs + 8], sys.byteorder)
            if end > size:
                raise ValueError(f"string at byte {offs} runs past the end of the file ({size} bytes)")
            parts += (plain[offs:offs + 8].view(u64), plain[offs + 8:end])
            idxs.append(len(parts) - 1)
            offs = end
        return offs - orig_offs, parts, idxs, [_ARRAY, _STRING]

    def _build_tensors(self, start_offs, fields):
        for f in fields:
            raw = int(f.parts[4][0])
            if raw not in GGMLQuantizationType._value2member_map_ or GGMLQuantizationType(raw) not in GGML_QUANT_SIZES:
                raise ValueError(f"tensor '{f.name}' has invalid ggml type {raw}")
        return super()._build_tensors(start_offs, fields)



@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int) -> Reader:
    return Reader(path)


def read(path: str | os.PathLike) -> Reader:
    """A reader of a checked file: missing, non-GGUF, damaged or truncated files raise one error
    naming the file. Parsing a file with a large
    vocabulary takes seconds, so readers are cached per (path, mtime, size): a command that
    checks, inspects and loads one file parses it once."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise RuntimeError_(f"{p}: not a regular file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise RuntimeError_(f"{p}: not a GGUF file (bad magic {magic!r})")
    st = p.stat()
    try:
        r = _reader(str(p.resolve()), st.st_mtime_ns, st.st_size)
    except Exception as e:  # the reader raises assorted errors on damaged files
        raise RuntimeError_(f"{p}: truncated or corrupt GGUF ({e.__class__.__name__}: {e})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in r.tensors), default=0)
    if end > st.st_size:
        raise RuntimeError_(f"{p}: truncated GGUF (tensor data ends at byte {end}, file has {st.st_size})")
    return r


def release_pages(reader: GGUFReader) -> None:
    """Drop the reader's resident pages from this process (they stay in the page cache, and a later
    read maps them again): a file read through once stops counting in the RSS. Not on every OS."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()
