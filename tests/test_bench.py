"""`bench`: JSON shape, arithmetic of the ratios and of the ideal speedup, errors, --kernels.

Speeds are never compared with each other (the test machine is shared and noisy): only structure,
positivity and arithmetic. Set CHESS_BENCH_TEST_FILE to an already converted *.chess.gguf to skip
the session conversion while iterating on this file.
"""
import io
import json
import math
import os
import stat
from pathlib import Path

import pytest
from conftest import BIN, run_cli

from chess_gguf import bench
from chess_gguf.bench import (
    decode_bytes,
    ideal_speedup,
    parse_levels,
    parse_methods,
    print_table,
    read_file,
    speedup_key,
)
from chess_gguf.runtime import RuntimeError_

FAST = ("--reps", "2", "--decode-tokens", "12", "--prompt-tokens", "32", "--threads", "1")


@pytest.fixture(scope="module")
def chess_file(request):
    pre = os.environ.get("CHESS_BENCH_TEST_FILE")
    return Path(pre) if pre else request.getfixturevalue("smol_chess")


@pytest.fixture(scope="module")
def file_info(chess_file):
    return read_file(chess_file)


def _json(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --- pure arithmetic ------------------------------------------------------------------------------

def _tensors(tied: bool, attention_copies: bool = True) -> dict:
    t = {"token_embd.weight": 1000, "output_norm.weight": 4}
    if not tied:
        t["output.weight"] = 800
    for il in (0, 1):
        b = f"blk.{il}."
        t.update({b + "attn_norm.weight": 2, b + "ffn_norm.weight": 2, b + "attn_q.bias": 1,
                  b + "attn_q.weight": 100, b + "attn_k.weight": 20, b + "attn_v.weight": 20,
                  b + "attn_output.weight": 100, b + "ffn_gate.weight": 300, b + "ffn_up.weight": 300,
                  b + "ffn_down.weight": 300, b + "chess_ffn_tau": 50, b + "chess_ffn_cats": 1,
                  b + "chess_wt_down": 320})
        if attention_copies:
            t.update({b + "chess_thr_q": 1, b + "chess_thr_o": 1, b + "chess_wt_q": 110, b + "chess_wt_o": 120})
    return t


def test_decode_bytes_dense():
    per_layer = 2 + 2 + 1 + 100 + 20 + 20 + 100 + 300 + 300 + 300  # 1145; CHESS tensors not counted
    # separate head: output.weight, not token_embd (one row of it is read)
    assert decode_bytes(_tensors(tied=False)) == 4 + 800 + 2 * per_layer
    # tied head: token_embd.weight is the head
    assert decode_bytes(_tensors(tied=True)) == 4 + 1000 + 2 * per_layer


def test_decode_bytes_sparse_and_ideal_speedup():
    t = _tensors(tied=False)
    fixed = 4 + 800 + 2 * (2 + 2 + 1 + 20 + 20 + 300)  # head, norms, bias, k, v, gate: always dense
    sp = {"ffn": 0.5, "q": 0.25, "o": 0.75}
    chess = fixed + 2 * (300 * 0.5 + 320 * 0.5 + 110 * 0.75 + 120 * 0.25)
    assert decode_bytes(t, "chess", sp) == pytest.approx(chess)
    ffn_only = fixed + 2 * (300 * 0.5 + 320 * 0.5 + 100 + 100)  # q/o sparsity ignored
    assert decode_bytes(t, "cats", sp) == pytest.approx(ffn_only)
    assert decode_bytes(t, "chess-ffn", sp) == pytest.approx(ffn_only)
    assert ideal_speedup(t, "chess", sp) == pytest.approx(decode_bytes(t) / chess)
    assert ideal_speedup(t, None, sp) == 1.0
    # level 0 on the sparse path reads the transposed copies: slightly more than dense here
    assert decode_bytes(t, "chess", {"ffn": 0.0, "q": 0.0, "o": 0.0}) == fixed + 2 * (300 + 320 + 110 + 120)


def test_decode_bytes_x4_pairs_always_read():
    """An x4 copy's affine pairs (fixed bytes) are read whatever the sparsity, its codes in proportion."""
    t = _tensors(tied=False)
    fixed_rest = 4 + 800 + 2 * (2 + 2 + 1 + 20 + 20 + 300)
    x4 = {f"blk.{il}.chess_wt_down": 64 for il in (0, 1)}
    sp = {"ffn": 0.5, "q": 0.25, "o": 0.75}
    want = fixed_rest + 2 * (300 * 0.5 + 64 + (320 - 64) * 0.5 + 110 * 0.75 + 120 * 0.25)
    assert decode_bytes(t, "chess", sp, x4) == pytest.approx(want)
    assert ideal_speedup(t, "chess", sp, x4) == pytest.approx(decode_bytes(t) / want)


def test_decode_bytes_per_layer_and_missing_copies():
    t = _tensors(tied=True, attention_copies=False)
    fixed = 4 + 1000 + 2 * (2 + 2 + 1 + 20 + 20 + 300)
    # per-layer lists; NaN = the layer ran dense (0); no W_q/W_o copies: attention stays dense under chess
    sp = {"ffn": [0.5, math.nan], "q": [0.9, 0.9], "o": [0.9, 0.9]}
    want = fixed + (300 * 0.5 + 320 * 0.5) + (300 + 320) + 2 * (100 + 100)
    assert decode_bytes(t, "chess", sp) == pytest.approx(want)
    # a layer without its FFN part runs its FFN dense whatever the counters say
    for k in ("chess_ffn_tau", "chess_ffn_cats", "chess_wt_down"):
        del t[f"blk.1.{k}"]
    want = fixed + (300 * 0.5 + 320 * 0.5) + (300 + 300) + 2 * (100 + 100)
    assert decode_bytes(t, "chess", {"ffn": 0.5}) == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown method"):
        decode_bytes(t, "relu", {})


def test_decode_bytes_fused_gate_up():
    """phi3/glm4: one ffn_up of 2 x n_ff rows, gate rows first; only its up half is read sparsely."""
    t = _tensors(tied=False)
    for il in (0, 1):
        t[f"blk.{il}.ffn_up.weight"] += t.pop(f"blk.{il}.ffn_gate.weight")  # 600: gate + up
    sp = {"ffn": 0.5, "q": 0.25, "o": 0.75}
    fixed = 4 + 800 + 2 * (2 + 2 + 1 + 20 + 20)
    want = fixed + 2 * (300 + 300 * 0.5 + 320 * 0.5 + 110 * 0.75 + 120 * 0.25)
    assert decode_bytes(t, "chess", sp) == pytest.approx(want)
    assert decode_bytes(t) == decode_bytes(_tensors(tied=False))


def test_decode_bytes_compact_layout():
    """Compact: no chess_wt_* copies; ffn_down, attn_q, attn_output are themselves stored transposed
    and read sparsely at their own size."""
    t = {k: v for k, v in _tensors(tied=False).items() if "chess_wt_" not in k}
    fixed = 4 + 800 + 2 * (2 + 2 + 1 + 20 + 20 + 300)
    sp = {"ffn": 0.5, "q": 0.25, "o": 0.75}
    assert decode_bytes(t, "chess", sp) == pytest.approx(fixed + 2 * (300 * 0.5 + 300 * 0.5 + 100 * 0.75 + 100 * 0.25))
    assert decode_bytes(t) == fixed + 2 * (100 + 100 + 300 + 300)


def test_argument_parsing():
    assert parse_levels("off, 0.50,0.7,0.5") == ["off", "0.5", "0.7"]
    assert parse_levels("default") == ["default"]
    assert parse_methods("chess,cats") == ["chess", "cats"]
    assert speedup_key("chess", "0.5", ["chess"]) == "0.5"
    assert speedup_key("chess", "0.5", ["chess", "cats"]) == "chess@0.5"
    assert speedup_key("cats", "0.5", ["cats"]) == "cats@0.5"


@pytest.mark.parametrize("args,needle", [(("--levels", "0.5,half"), "bad level 'half'"),
                                         (("--levels", "1.5"), "in (0, 1)"),
                                         (("--methods", "relu"), "unknown method 'relu'"),
                                         (("--reps", "0"), "positive integer")])
def test_bad_arguments(tmp_path, args, needle):
    r = run_cli("bench", tmp_path / "x.chess.gguf", *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


# --- errors on the file and the levels ------------------------------------------------------------

def _one_line_error(r, *needles):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr


def test_missing_and_bad_files(tmp_path, smol_path):
    _one_line_error(run_cli("bench", tmp_path / "none.chess.gguf"), "none.chess.gguf", "no such file")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"hello world")
    _one_line_error(run_cli("bench", bad), "bad.gguf", "not a GGUF file")
    _one_line_error(run_cli("bench", smol_path), str(smol_path), "not a CHESS file")


def test_level_not_stored_is_the_runtime_error(chess_file):
    r = run_cli("bench", chess_file, "--levels", "0.55", *FAST)
    _one_line_error(r, "'0.55' is not a level stored")
    assert r.stdout == ""


# --- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_json(chess_file):
    r = run_cli("bench", chess_file, "--levels", "0.5,0.7", "--json", *FAST)
    return _json(r), r.stderr


def test_json_shape_and_ratios(chess_file, bench_json):
    res, err = bench_json
    assert set(res) >= {"results", "decode_speedup", "ideal_speedup"}
    assert [(r["method"], r["level"]) for r in res["results"]] == [("dense", "off"), ("chess", 0.5), ("chess", 0.7)]
    assert set(res["decode_speedup"]) == set(res["ideal_speedup"]) == {"0.5", "0.7"}
    assert (res["threads"], res["reps"], res["decode_tokens"], res["prompt_tokens"]) == (1, 2, 12, 32)
    base = res["results"][0]
    assert base["realised_sparsity"] == {"ffn": 0.0, "q": 0.0, "o": 0.0, "head": 0.0} and base["ideal_speedup"] == 1.0
    for r in res["results"]:
        assert set(r) >= {"level", "method", "decode_tps", "prefill_tps", "realised_sparsity"}
        assert set(r["realised_sparsity"]) == {"ffn", "q", "o", "head"}
        assert len(r["decode_tps_runs"]) == len(r["prefill_tps_runs"]) == 2
        assert all(x > 0 for x in r["decode_tps_runs"] + r["prefill_tps_runs"])
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0
        assert min(r["decode_tps_runs"]) <= r["decode_tps"] <= max(r["decode_tps_runs"])
        assert r["decode_speedup"] == pytest.approx(r["decode_tps"] / base["decode_tps"])
        assert r["prefill_speedup"] == pytest.approx(r["prefill_tps"] / base["prefill_tps"])
        if r["level"] != "off":
            key = f"{r['level']:g}"
            assert res["decode_speedup"][key] == pytest.approx(r["decode_tps"] / base["decode_tps"])
            assert res["ideal_speedup"][key] == r["ideal_speedup"]
            assert r["sparse_tokens"] == 12  # the counters saw exactly the timed decode tokens
            assert r["realised_sparsity"]["head"] == 0.0  # the fixture's head is dense (--head off)
            for part, s in r["realised_sparsity"].items():
                assert part == "head" or abs(s - r["level"]) < 0.15, (part, s, r["level"])
    assert "round 2/2" in err  # progress on stderr


def test_ideal_speedup_from_the_file(file_info, bench_json):
    res, _ = bench_json
    info = file_info
    dense = decode_bytes(info["tensors"])
    assert res["weight_bytes_dense"] == pytest.approx(dense)
    # the default conversion of SmolLM2 has x4 copies: their pairs (4 of 20 bytes) are read at any sparsity
    assert len(info["fixed"]) == 90 and all(5 * v == info["tensors"][k] for k, v in info["fixed"].items())
    prev = 1.0
    for r in res["results"][1:]:
        sparse = decode_bytes(info["tensors"], "chess", r["realised_sparsity_per_layer"], info["fixed"])
        assert r["ideal_speedup"] == pytest.approx(dense / sparse)
        assert r["weight_bytes_per_token"] == pytest.approx(sparse)
        assert r["ideal_speedup"] > prev  # fewer bytes at the higher level (arithmetic, not timing)
        prev = r["ideal_speedup"]


def test_table(bench_json):
    out = io.StringIO()
    print_table(bench_json[0], out)
    text = out.getvalue()
    assert "decode t/s" in text and "ideal" in text and "MB/tok" in text
    assert any(line.split()[:2] == ["chess", "0.7"] for line in text.splitlines())


def test_layouts_against_the_original(smol_path, chess_file):
    """Several files + --original + --memory: one process, every setting of every file interleaved,
    each file against the original's dense medians, sizes and peak memory from child processes."""
    res = _json(run_cli("bench", chess_file, chess_file, "--original", smol_path, "--levels", "0.5", "--memory",
                        "--json", *FAST))
    base = res["original"]
    assert base["file"] == str(smol_path) and base["size_bytes"] == smol_path.stat().st_size
    assert len(base["decode_tps_runs"]) == 2 and base["decode_tps"] > 0
    # the runtime maps the whole file: at least the weights are resident (no timing involved)
    assert base["peak_rss_bytes"] > 0.9 * base["size_bytes"]
    assert len(res["files"]) == 2
    for f in res["files"]:
        assert f["layout"] == "dual" and f["size_bytes"] == chess_file.stat().st_size
        assert f["size_vs_original"] == pytest.approx(f["size_bytes"] / base["size_bytes"])
        assert f["peak_rss_level"] == "0.5" and f["peak_rss_bytes"] > 0.9 * f["size_bytes"]
        assert f["peak_rss_vs_original"] == pytest.approx(f["peak_rss_bytes"] / base["peak_rss_bytes"])
        assert [(r["method"], r["level"]) for r in f["results"]] == [("dense", "off"), ("chess", 0.5)]
        for r in f["results"]:
            assert r["decode_vs_original"] == pytest.approx(r["decode_tps"] / base["decode_tps"])
            assert r["prefill_vs_original"] == pytest.approx(r["prefill_tps"] / base["prefill_tps"])
    out = io.StringIO()
    print_table(res, out)
    assert "(dual layout)" in out.getvalue() and "x original" in out.getvalue()


def test_layouts_of_different_models_refused(smol_path, qwen_path, chess_file):
    _one_line_error(run_cli("bench", smol_path, "--original", smol_path, *FAST), str(smol_path), "not a CHESS file")
    r = run_cli("bench", chess_file, "--original", qwen_path, *FAST)
    _one_line_error(r, str(chess_file), "tokenizes the benchmark text differently", str(qwen_path))
    _one_line_error(run_cli("bench", chess_file, "--kernels", "--original", smol_path), "--kernels takes one CHESS file")


def test_several_methods_key_by_method(chess_file):
    res = _json(run_cli("bench", chess_file, "--levels", "0.5", "--methods", "chess,cats", "--json",
                        "--reps", "1", "--decode-tokens", "8", "--prompt-tokens", "16", "--threads", "1"))
    assert set(res["decode_speedup"]) == set(res["ideal_speedup"]) == {"chess@0.5", "cats@0.5"}
    cats = next(r for r in res["results"] if r["method"] == "cats")
    assert cats["realised_sparsity"]["q"] == cats["realised_sparsity"]["o"] == 0.0 < cats["realised_sparsity"]["ffn"]
    assert res["ideal_speedup"]["chess@0.5"] > res["ideal_speedup"]["cats@0.5"]


# --- --kernels ------------------------------------------------------------------------------------

def test_kernels_missing_binary(chess_file, tmp_path):
    r = run_cli("bench", chess_file, "--kernels", env={"CHESS_GGUF_LIB": str(tmp_path)})
    _one_line_error(r, str(tmp_path / "chess-bench-kernels"), "not found")


FAKE = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
echo "progress" >&2
keep=$3; threads=$5
k='{"name": "ffn_up", "type": "q4_1", "in": 4, "out": 8, "route": "avx2-q4_1", "dense_us": 2.0, "sparse_us": 1.0, "speedup": 2.0, "byte_ratio": 2.0}'
echo '{"threads": '$threads', "keep": '$keep', "kernels": ['"$k"']}'
"""


def test_kernels_runs_each_level_and_thread_count(chess_file, file_info, tmp_path, monkeypatch):
    exe = tmp_path / "chess-bench-kernels"
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    env = {"CHESS_GGUF_LIB": str(tmp_path)}
    res = _json(run_cli("bench", chess_file, "--kernels", "--levels", "0.5,0.7", "--threads", "3", "--reps", "2",
                        "--json", env=env))
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"{chess_file} --keep {k} --threads {t} --reps 2" for k in ("0.5", "0.3") for t in (1, 3)]
    assert [(k["level"], k["keep"], k["threads"]) for k in res["kernels"]] == [
        (0.5, 0.5, 1), (0.5, 0.5, 3), (0.7, 0.3, 1), (0.7, 0.3, 3)]
    # the rest in process (each CLI run parses the GGUF again, which takes seconds)
    monkeypatch.setenv("CHESS_GGUF_LIB", str(tmp_path))
    monkeypatch.setattr(bench, "read_file", lambda path: file_info)
    out = io.StringIO()
    bench.print_kernels(bench.run_kernels(chess_file, levels=["0.5"], threads=1, progress=lambda m: None), out)
    assert "ffn_up" in out.getvalue() and "2.00x" in out.getvalue()
    with pytest.raises(ValueError, match=r"level 0\.55 is not stored"):
        bench.run_kernels(chess_file, levels=["0.55"], threads=1, progress=lambda m: None)
    exe.write_text("#!/bin/sh\necho 'kaputt' >&2\nexit 3\n")
    with pytest.raises(RuntimeError_, match=r"failed \(exit 3\): kaputt"):
        bench.run_kernels(chess_file, levels=["0.5"], threads=1, progress=lambda m: None)
    exe.write_text("#!/bin/sh\necho 'not json'\n")
    with pytest.raises(ValueError, match="not the expected JSON"):
        bench.run_kernels(chess_file, levels=["0.5"], threads=1, progress=lambda m: None)


@pytest.mark.skipif(not (BIN / "chess-bench-kernels").is_file(), reason="chess-bench-kernels not built")
def test_kernels_real_binary(chess_file):
    res = _json(run_cli("bench", chess_file, "--kernels", "--levels", "0.5", "--threads", "1", "--reps", "1",
                        "--json", env={"CHESS_GGUF_LIB": ""}))
    assert len(res["kernels"]) == 1
    run = res["kernels"][0]
    assert (run["level"], run["threads"]) == (0.5, 1) and run["keep"] == pytest.approx(0.5)
    assert {k["name"] for k in run["kernels"]} >= {"ffn_up", "ffn_down"}
    for k in run["kernels"]:
        assert k["dense_us"] > 0 and k["sparse_us"] > 0 and k["in"] > 0 and k["out"] > 0 and k["route"]
        assert k["speedup"] == pytest.approx(k["dense_us"] / k["sparse_us"], rel=0.02)
