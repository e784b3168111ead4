#!/usr/bin/env python3
"""Peak memory of a command, by phase: rss_profile.py [--every 0.1] -- CMD ...

Polls /proc/PID/status (VmRSS = RssAnon + RssFile + RssShmem) of the command and its children and
prints, for each line the command writes to stderr (progress bars: the phase), the peaks seen since
the previous line; then the overall peak (VmHWM of the command itself). Used for convert's memory
figures in docs/measurements.md.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) // 1024  # MB
    except OSError:
        pass
    return out


def main() -> int:
    argv = sys.argv[1:]
    every = 0.1
    if argv[:1] == ["--every"]:
        every, argv = float(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, errors="replace")
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    overall = dict(peak)
    hwm = [0]
    lock = threading.Lock()

    def poll() -> None:
        while p.poll() is None:
            s = status(p.pid)
            with lock:
                for k in peak:
                    peak[k] = max(peak[k], s.get(k, 0))
                    overall[k] = max(overall[k], s.get(k, 0))
                hwm[0] = max(hwm[0], s.get("VmHWM", 0))
            time.sleep(every)

    t0 = time.monotonic()
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    buf = ""
    while True:
        ch = p.stderr.read(1)
        if not ch:
            break
        if ch in "\r\n":
            if buf.strip():
                with lock:
                    print(f"[{time.monotonic() - t0:7.1f}s rss {peak['VmRSS']:5d} anon {peak['RssAnon']:5d} "
                          f"file {peak['RssFile']:5d} MB] {buf.strip()[:110]}", file=sys.stderr, flush=True)
                    for k in peak:
                        peak[k] = 0
            buf = ""
        else:
            buf += ch
    rc = p.wait()
    th.join()
    print(f"peak: rss {overall['VmRSS']} MB (anon {overall['RssAnon']}, file {overall['RssFile']}); "
          f"VmHWM {hwm[0]} MB; exit {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
