"""scripts/head_study.py (issue #19's offline head measurement) on a converted SmolLM2: the numpy head
must reproduce the runtime's logits row for row (the captured hidden states are aligned with the
scored logits), and head sparsity must cost quality and bytes in the expected direction."""
import importlib.util
import json

from conftest import REPO


def _study():
    spec = importlib.util.spec_from_file_location("head_study", REPO / "scripts" / "head_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_head_study_reproduces_the_runtime(smol_chess, tmp_path):
    out = tmp_path / "head.json"
    assert _study().main([str(smol_chess), "--windows", "1", "--head", "0,0.3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # a misaligned row would differ by the logits' own scale (~40); Q8_0 rounding of h gives < 1
    assert res["check_max_diff"] < 0.05 * res["logit_max"], res["check_max_diff"]
    rows = {(r["level"], r["head"]): r for r in res["rows"]}
    assert set(rows) == {(lv, s) for lv in (None, 0.3, 0.5, 0.7) for s in (0.0, 0.3)}
    dense, head = rows[(None, 0.0)], rows[(None, 0.3)]
    assert dense["kld"] == 0.0 and dense["head_realised"] == 0.0
    assert 0.2 < head["head_realised"] < 0.4  # fitted on wiki_calib, realised on wiki_eval
    assert head["kld"] > 0 and head["mb_per_token"] < dense["mb_per_token"]
    for lv in (0.3, 0.5, 0.7):  # sparser head on top of each level: fewer bytes, more divergence
        a, b = rows[(lv, 0.0)], rows[(lv, 0.3)]
        assert b["mb_per_token"] < a["mb_per_token"] < dense["mb_per_token"]
        assert b["kld"] > a["kld"] > 0
