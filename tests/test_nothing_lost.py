"""Nothing lost (#7): an interrupted or failing convert leaves the input untouched and no output
(not even a temporary file), and a rerun succeeds. Interrupts: SIGINT and SIGTERM at seeded
random times, from calibration through writing; a full disk: the child's file-size limit
(RLIMIT_FSIZE, so the write fails with EFBIG part-way, like ENOSPC; no root or tmpfs needed)."""
import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

ARGS = ["--calib-tokens", "2048", "--levels", "0.5", "--threads", "2", "-q"]


def _sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _convert(src, out, **kw):
    return subprocess.Popen([sys.executable, "-m", "chess_gguf", "convert", str(src), "-o", str(out), *ARGS],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def full_run(smol_path, tmp_path_factory):
    """One uninterrupted convert: how long it takes (to place the interrupts), its output's size."""
    out = tmp_path_factory.mktemp("full") / "smol.chess.gguf"
    t0 = time.monotonic()
    p = _convert(smol_path, out)
    _, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err
    assert out.stat().st_size > smol_path.stat().st_size
    return {"seconds": time.monotonic() - t0, "size": out.stat().st_size}


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
