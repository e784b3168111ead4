"""Command-line values shared by the commands: methods, levels, tasks, counts. One parser per kind
of value, each raising ValueError with a readable message; `arg` turns one into an argparse type.

Only the standard library is imported (the CLI builds its parser from here before loading numpy).
"""
from __future__ import annotations

import argparse
from typing import Callable

from .data import TASKS

METHODS = ("cats", "chess-ffn", "chess")  # the paper's order: eval's rows and plots follow it
LAYOUTS = ("dual", "compact")  # chess.layout (docs/format.md)
PREFILLS = ("dense", "masked")  # prompt processing of a sparse setting (CHESS_PREFILL)


def parse_levels(s: str, allow_default: bool = True) -> list[str]:
    """'off', 'default' (when allowed: the file's default level) or levels in (0, 1), as '%g'
    strings, duplicates dropped, order kept."""
    out = []
    for x in (x.strip().lower() for x in s.split(",")):
        if not x:
            continue
        if x == "off" or (x == "default" and allow_default):
            out.append(x)
            continue
        try:
            v = float(x)
        except ValueError:
            what = "off, default or a number" if allow_default else "off or a number"
            raise ValueError(f"bad level {x!r}: expected {what} such as 0.5") from None
        if not 0.0 < v < 1.0:
            raise ValueError(f"bad level {x!r}: a level is in (0, 1)")
        out.append(f"{v:g}")
    if not out:
        raise ValueError("--levels: no level given")
    return list(dict.fromkeys(out))


def parse_methods(s: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r} (expected {', '.join(METHODS)})")
    if not out:
        raise ValueError("--methods: no method given")
    return list(dict.fromkeys(out))


def parse_tasks(s: str) -> list[str]:
    if s.strip().lower() == "none":
        return []
    if s.strip().lower() == "all":
        return list(TASKS)
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in TASKS]
    if bad:
        raise ValueError(f"unknown task {bad[0]!r} (valid: {', '.join(TASKS)}, all or none)")
    return list(dict.fromkeys(out))


def parse_floats(s: str) -> list[float]:
    """convert's --levels: the levels to store, comma-separated numbers (checked by convert)."""
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {s!r}") from None


def parse_head(s: str):
    """convert's --head: off ([]: the head stays dense), or sparsities of the output head's input, one
    for every level or one per level (checked by convert)."""
    if s.strip().lower() == "off":
        return []
    return parse_floats(s)


def parse_seconds(s: str) -> float:
    """A duration in seconds, >= 0 (convert's --checkpoint-every)."""
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"expected a number of seconds >= 0, got {s!r}")
    return v


def arg(parse: Callable, **kw) -> Callable:
    """An argparse type from a parser above (its ValueError becomes argparse's usage error, exit 2)."""
    def typ(s: str):
        try:
            return parse(s, **kw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    typ.__name__ = parse.__name__.removeprefix("parse_")
    return typ


def at_least(n: int) -> Callable[[str], int]:
    """argparse type: an integer >= n."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = n - 1
        if v < n:
            want = "a positive integer" if n == 1 else f"an integer >= {n}"
            raise argparse.ArgumentTypeError(f"expected {want}, got {s!r}")
        return v
    parse.__name__ = "positive_int" if n == 1 else f"integer >= {n}"
    return parse


positive_int = at_least(1)
