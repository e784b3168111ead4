"""Nothing lost (#7): an interrupted or failing convert leaves the input untouched and no output
(not even a temporary file), and a rerun succeeds. Interrupts: SIGINT and SIGTERM at seeded
random times, from calibration through writing; a full disk: the child's file-size limit
(RLIMIT_FSIZE, so the write fails with EFBIG part-way, like ENOSPC; no root or tmpfs needed)."""
import hashlib
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

ARGS = ["--calib-tokens", "2048", "--levels", "0.5", "--threads", "2", "-q"]


def _sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a parent that ignores SIGINT (`cmd &`) must not make the test vacuous


def _convert(src, out, *extra, **kw):
    kw.setdefault("preexec_fn", _default_sigint)
    return subprocess.Popen([sys.executable, "-m", "chess_gguf", "convert", str(src), "-o", str(out), *ARGS, *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _leftovers(folder):
    """Files in folder besides a calibration checkpoint (kept on purpose: a rerun resumes from it)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".calib-partial"))


@pytest.fixture(scope="module")
def full_run(smol_path, tmp_path_factory):
    """One uninterrupted convert: how long it takes (to place the interrupts), its output's size."""
    out = tmp_path_factory.mktemp("full") / "smol.chess.gguf"
    t0 = time.monotonic()
    p = _convert(smol_path, out)
    so, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err
    assert out.stat().st_size > smol_path.stat().st_size
    assert not out.with_name(out.name + ".calib-partial").exists()  # removed on success
    calib = float(re.search(r"calibration ([\d.]+) s", so).group(1))
    return {"seconds": time.monotonic() - t0, "size": out.stat().st_size, "sha": _sha(out), "calib": calib}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_loses_nothing(smol_path, tmp_path, full_run, sig):
    before = _sha(smol_path)
    rng = random.Random(int(sig))
    # early (start-up/calibration), middle, and late (transposing/writing the file)
    for frac in (rng.uniform(0.1, 0.3), rng.uniform(0.4, 0.7), rng.uniform(0.8, 0.98)):
        out = tmp_path / "smol.chess.gguf"
        p = _convert(smol_path, out)
        time.sleep(frac * full_run["seconds"])
        p.send_signal(sig)
        _, err = p.communicate(timeout=600)
        if out.exists():  # the signal came after the file was renamed into place: it must be whole
            assert out.stat().st_size == full_run["size"], (p.returncode, err)
            out.unlink()
            assert _leftovers(tmp_path) == []
            continue
        assert p.returncode in (1, 130, -int(sig)), (p.returncode, err)
        assert "Traceback" not in err, err
        assert _leftovers(tmp_path) == [], f"left behind after {sig.name} at {frac:.2f}: {_leftovers(tmp_path)}"
    assert _sha(smol_path) == before
    p = _convert(smol_path, tmp_path / "smol.chess.gguf")  # a rerun succeeds
    _, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err


def test_full_disk_loses_nothing(smol_path, tmp_path):
    before = _sha(smol_path)
    limit = smol_path.stat().st_size // 2  # the output is larger than the input: fails mid-write

    def small_disk():
        _default_sigint()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "smol.chess.gguf"
    p = _convert(smol_path, out, preexec_fn=small_disk)
    _, err = p.communicate(timeout=1800)
    assert p.returncode == 1, err
    assert "Traceback" not in err and str(out) in err and "writing failed" in err, err
    assert _leftovers(tmp_path) == []
    assert _sha(smol_path) == before
    p = _convert(smol_path, out)
    _, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err
    assert os.path.getsize(out) > limit


def test_interrupted_convert_resumes(smol_path, tmp_path, full_run):
    """#16 resume: SIGINT at a seeded random time during calibration (statistics saved after every
    window); the same command again resumes from OUT.calib-partial and writes the same bytes as an
    uninterrupted run; a damaged checkpoint is one clean error."""
    out = tmp_path / "smol.chess.gguf"
    ck = out.with_name(out.name + ".calib-partial")
    resumed = 0
    for seed in (1, 2):
        p = _convert(smol_path, out, "--checkpoint-every", "0")
        t0 = time.monotonic()
        while not ck.exists() and p.poll() is None and time.monotonic() - t0 < 600:
            time.sleep(0.05)
        time.sleep(random.Random(seed).uniform(0.0, 0.5) * full_run["calib"])
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=600)
        if p.returncode == 0:  # finished first: nothing to resume
            out.unlink()
            continue
        assert p.returncode in (1, 130) and "Traceback" not in err, (p.returncode, err)
        assert _leftovers(tmp_path) == [] and ck.exists()
        with np.load(ck) as z:
            assert int(z["windows"]) >= 1
        p = _convert(smol_path, out, "--checkpoint-every", "0")
        _, err = p.communicate(timeout=1800)
        assert p.returncode == 0, err
        assert _sha(out) == full_run["sha"]
        assert sorted(q.name for q in tmp_path.iterdir()) == [out.name]  # the checkpoint is gone
        out.unlink()
        resumed += 1
    assert resumed >= 1
    ck.write_bytes(b"PK\x03\x04 not a whole zip")
    p = _convert(smol_path, out)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 1 and "Traceback" not in err and f"{ck}: damaged calibration checkpoint" in err, err
    assert not out.exists()
