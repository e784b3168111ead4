"""Hostile files (issue #7): ~290 damaged or malformed variants of a real converted SmolLM2 must each
end in a clean refusal or a correct run, both in `inspect` (in-process) and in the patched runtime
(llama-simple, which mmaps the file). tests/mutate.py builds and runs the mutants.

Beyond "no crash", the suite states what each mutant must do: malformed thresholds, shapes, types,
levels and default level are refused with a message naming the offending tensor or key; legal
variations (a missing CHESS tensor, +inf in chess_ffn_tau, a requantized copy) run.
"""
import collections
import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from gguf import GGUFReader

import mutate
from mutate import ANY, CRASHED, FAMILIES, RAN, REFUSE, REFUSED, RUN

WORKERS = 2  # the machine has 2 cores; each worker owns a working copy


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(16 << 20), b""):
            h.update(b)
    return h.hexdigest()


@pytest.fixture(scope="module")
def campaign(smol_chess, tmp_path_factory):
    assert mutate.SIMPLE.exists(), f"{mutate.SIMPLE} missing: run `make`"
    pristine = Path(smol_chess)
    digest = _sha256(pristine)
    mutants = mutate.generate(GGUFReader(pristine))
    tmp = tmp_path_factory.mktemp("hostile")
    # spawn, not fork: the test process may hold libllama and its OpenMP threads
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"),
                             initializer=mutate.init_worker, initargs=(str(pristine), str(tmp))) as pool:
        results = list(pool.map(mutate.run_one, mutants))
    report = tmp / "report.json"
    report.write_text(json.dumps([{**{k: v for k, v in r.items() if k != "mutant"}, "family": r["mutant"].family,
                                   "name": r["mutant"].name, "expect_runtime": r["mutant"].runtime,
                                   "expect_inspect": r["mutant"].inspect, "names": r["mutant"].names}
                                  for r in results], indent=1))
    works = sorted(tmp.glob("work-*.gguf"))
    return {"results": results, "digest": digest, "pristine": pristine, "works": works, "tmp": tmp, "report": report}


def _line(r, side: str) -> str:
    m = r["mutant"]
    msg = r[f"{side}_msg"].strip() or ("exit 0" if side == "runtime" else "returned its report")
    return f"[{m.family}] {m.name}: {r[side]}\n      " + msg.replace("\n", "\n      ")


def test_mutant_families(campaign):
    res = campaign["results"]
    assert len(res) >= 200
    per = collections.Counter(r["mutant"].family for r in res)
    assert set(per) == set(FAMILIES), per
    thin = {f: n for f, n in per.items() if f != "control" and n < 10}
    assert not thin, f"families with fewer than 10 mutants: {thin}"
    assert len({r["mutant"].name for r in res}) == len(res)


def test_files_restored(campaign):
    """In-place patches are undone: the working copies end identical to the untouched original."""
    assert _sha256(campaign["pristine"]) == campaign["digest"]
    assert campaign["works"], "no working copy found"
    for w in campaign["works"]:
        assert _sha256(w) == campaign["digest"], f"{w} differs from the original after the campaign"
    leftovers = sorted(p.name for p in campaign["tmp"].glob("mutant-*.gguf"))
    assert not leftovers, leftovers


def test_control_runs(campaign):
    for r in campaign["results"]:
        if r["mutant"].family == "control":
            assert r["runtime"] == RAN and r["inspect"] == RAN, (_line(r, "runtime"), _line(r, "inspect"))


def test_runtime_never_crashes(campaign):
    bad = [_line(r, "runtime") for r in campaign["results"] if r["runtime"] == CRASHED]
    assert not bad, f"{len(bad)} mutants crashed the runtime (signal, abort, assertion, sanitizer, timeout or " \
                    f"no message):\n" + "\n".join(bad)


def test_inspect_never_crashes(campaign):
    bad = [_line(r, "inspect") for r in campaign["results"] if r["inspect"] == CRASHED]
    assert not bad, f"{len(bad)} mutants crashed inspect:\n" + "\n".join(bad)


def _mismatches(results, side: str) -> list[str]:
    out = []
    for r in results:
        m, got = r["mutant"], r[side]
        want = m.runtime if side == "runtime" else m.inspect
        names = m.names if side == "runtime" else m.inspect_must_name
        if got == CRASHED or want == ANY:
            continue  # crashes have their own tests
        if want == REFUSE and got == RAN:
            out.append(f"wrongly accepted: {_line(r, side)}")
        elif want == RUN and got == REFUSED:
            out.append(f"wrongly refused: {_line(r, side)}")
        elif want == REFUSE and names and not any(n in r[f"{side}_msg"] for n in names):
            out.append(f"refused without naming {' or '.join(names[:3])}{' ...' if len(names) > 3 else ''}: "
                       f"{_line(r, side)}")
    return out


def test_runtime_refuses_malformed_and_runs_legal(campaign):
    """The patched loader refuses each malformed mutant with the tensor or key named (in its error
    lines, not the metadata dump), and runs the legal variations."""
    bad = _mismatches(campaign["results"], "runtime")
    assert not bad, f"{len(bad)} runtime expectations failed (report: {campaign['report']}):\n" + "\n".join(bad)


def test_inspect_refuses_malformed_and_runs_legal(campaign):
    bad = _mismatches(campaign["results"], "inspect")
    assert not bad, f"{len(bad)} inspect expectations failed:\n" + "\n".join(bad)


def test_inspect_refusals_name_the_file(campaign):
    """Every inspect refusal is one line naming the file (the CLI prints it as `error: ...`)."""
    bad = [_line(r, "inspect") for r in campaign["results"]
           if r["inspect"] == REFUSED and (r["path"] not in r["inspect_msg"] or "\n" in r["inspect_msg"].strip())]
    assert not bad, f"{len(bad)} inspect refusals without the file named:\n" + "\n".join(bad)


def test_inspect_cli_error(smol_chess, tmp_path):
    """The CLI turns a refusal into `error: FILE: TENSOR: problem` and exit 1 (one mutant, end to end)."""
    from conftest import run_cli
    reader = GGUFReader(smol_chess)
    lay = mutate.Layout(reader)
    name = "blk.3.chess_ffn_tau"
    bad = tmp_path / "nan.gguf"
    data = bytearray(Path(smol_chess).read_bytes())
    off = lay.data_of(name)[0] + 4 * 17
    data[off:off + 4] = mutate.f32(float("nan"))
    bad.write_bytes(bytes(data))
    r = run_cli("inspect", bad)
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: {bad}: {name}: invalid threshold nan"), r.stderr
    assert "Traceback" not in r.stderr


def test_zero_dim_overflow_refused(tmp_path):
    """A shape stock gguf.cpp accepts and ggml then aborts on (found by the fuzzer in CI): the
    patched runtime refuses it with gguf's own message (native/patches/0005-gguf-shape-check.patch).
    The same bytes are a regression seed of `make test-fuzz` (scripts/fuzz-seeds.py)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("fuzz_seeds", mutate.REPO / "scripts" / "fuzz-seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    bad = tmp_path / "zero-dim-overflow.gguf"
    seeds.regression_zero_dim_overflow(bad)
    outcome, msg, _ = mutate.run_runtime(bad, ())
    assert outcome == REFUSED, msg
    assert "incorrect shape for a tensor" in msg, msg
