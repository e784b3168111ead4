"""Paired KLD differences between two `eval --kld` runs of files with the same dense weights (two converts of
one model: other calibration tokens, rule or levels), row by row and text by text.

    .venv/bin/python scripts/kld_compare.py A/results.json B/results.json

Both runs must score the same windows (same --ppl texts, --ppl-tokens and --ctx) and their dense rows must
agree (same original weights): each row's KLD is then measured from the same reference, and the
difference of two files' rows has a paired interval (bootstrap over windows) far narrower than either
row's own. Prints one line per row and text: A's mean, B's mean, A - B [95% interval].
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chess_gguf.evaluate import row_label  # noqa: E402
from chess_gguf.kld import paired  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    ra, rb = (json.loads(p.read_text()) for p in (args.a, args.b))
    da, db = ({row_label(r): r for r in res["results"]} for res in (ra, rb))
    if "dense" in da and "dense" in db and da["dense"].get("ppl_texts") != db["dense"].get("ppl_texts"):
        print("note: the dense rows differ: the two files do not have the same dense weights or texts",
              file=sys.stderr)
    print(f"A = {args.a}\nB = {args.b}")
    print("| row | text | KLD A | KLD B | A - B [95% CI] |\n|---|---|---|---|---|")
    for label, r in da.items():
        other = db.get(label)
        for text, ka in (r.get("kld_texts") or {}).items():
            kb = (other or {}).get("kld_texts", {}).get(text)
            if kb is None:
                continue
            d = paired(ka, kb)
            ci = "" if d["ci95"] is None else f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
            print(f"| {label} | {text} | {ka['mean']:.4f} | {kb['mean']:.4f} | {d['diff']:+.4f}{ci} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
