"""Corpus building for scripts/fetch_data.py (`make data`): MediaWiki XML -> clean prose
(clean_wikitext), the deterministic calibration/evaluation splits, and the passages of the other
text domains (LAMBADA novels, CoQA news, Qasper papers). The formats of the files it produces are
described in chess_gguf/data.py, which the package reads them through.
"""
from __future__ import annotations

import calendar
import hashlib
import html
import io
import re
import xml.etree.ElementTree as ET
from typing import Iterator


# --- MediaWiki XML dump ---------------------------------------------------------------------


def iter_pages(xml_bytes: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each article: namespace 0, not a redirect."""
    for _, el in ET.iterparse(io.BytesIO(xml_bytes)):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        local = {c.tag.rsplit("}", 1)[-1]: c for c in el.iter()}  # title, ns, redirect, text
        text = (local["text"].text or "") if "text" in local else ""
        if (local.get("ns") is not None and local["ns"].text == "0" and "redirect" not in local
                and not text.lstrip().upper().startswith("#REDIRECT")):
            yield local["title"].text, text
        el.clear()  # the dump is a few MB; keep memory flat anyway


# --- wikitext -> prose ----------------------------------------------------------------------

# Sections that are citations, link lists or bibliographies rather than prose.
DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "references and notes",
    "works cited", "gallery", "literature", "selected bibliography", "primary sources",
    "secondary sources", "cited sources", "general references", "additional reading",
    "notes and citations", "explanatory notes", "external link", "other uses", "works",
    "selected works", "filmography", "discography", "publications",
}
# Tags whose content is not prose (or not text at all).
_DROP_TAGS = ("gallery", "timeline", "imagemap", "score", "syntaxhighlight", "source",
              "pre", "chem", "ce", "hiero", "graph", "mapframe", "templatedata", "noinclude",
              "includeonly", "categorytree", "table")
_DROP_LINK_PREFIXES = {"file", "image", "category", "media"}
_SISTER_PREFIXES = {"wikt", "wiktionary", "s", "wikisource", "commons", "q", "wikiquote", "b",
                    "wikibooks", "n", "wikinews", "v", "wikiversity", "species", "m", "meta", "w"}

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_DROP_TAG = re.compile(r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(_DROP_TAGS), re.I | re.S)
_SELF_CLOSING = re.compile(r"<(?:references|%s)\b[^>]*/\s*>" % "|".join(_DROP_TAGS), re.I)
_TEMPLATE = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.S)  # innermost only
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)  # innermost only
_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)  # innermost only
_EXTLINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]\[]+(?:[ \t]+([^\]\[]*))?\]", re.I)
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_MAGIC = re.compile(r"__[A-Z]+__")
_MATH = re.compile(r"<math\b[^>]*>(.*?)</math\s*>", re.I | re.S)

# Inline templates whose output is part of a sentence (shown: first or last positional
# argument); any other template is dropped.
_KEEP_FIRST = {"ill", "nihongo", "abbr", "flag", "flagcountry", "formatnum", "vanchor",
               "visible anchor"}
_KEEP_LAST = {"nowrap", "nobr", "small", "smaller", "big", "sic", "em", "strong", "smallcaps",
              "nobold", "noitalic", "transl", "transliteration", "lang", "keypress", "wikt-lang",
              "chem name", "angbr", "linktext", "nowiki"}
_LITERAL = {"'": "'", "mdash": "—", "ndash": "–", "snd": " – ", "spaced ndash": " – ",
            "nbsp": " ", "-": "", "clear": "", "·": " · ", "dot": " · ", "pipe": "", "!": ""}


def _render_template(body: str) -> str:
    parts = [p.strip() for p in body.split("|")]
    name = parts[0].replace("_", " ").strip().lower()
    pos = [p for p in parts[1:] if not re.match(r"^[\w ]+=", p)]
    named = dict(p.split("=", 1) for p in parts[1:] if re.match(r"^[\w ]+=", p))
    if name in _LITERAL:
        return _LITERAL[name]
    if "[[" in body:  # pipes of a nested link would break the argument split
        return ""
    if name in ("convert", "cvt") and len(pos) >= 2:
        if len(pos) >= 4 and pos[1] in ("to", "-", "–", "and", "or", "by", "x"):
            return f"{pos[0]} {pos[1]} {pos[2]} {pos[3]}"
        return f"{pos[0]} {pos[1]}"
    if name in ("birth date", "death date", "birth date and age", "death date and age",
                "start date", "end date", "dob", "date") and len(pos) >= 3 and all(
            p.isdigit() for p in pos[:3]) and 1 <= int(pos[1]) <= 12:
        return f"{int(pos[2])} {calendar.month_name[int(pos[1])]} {pos[0]}"
    if name in ("quote", "blockquote", "cquote", "quotation") and (pos or "text" in named):
        return named.get("text", pos[0] if pos else "")
    if name == "as of" and pos:
        return "As of " + " ".join(pos[:1])
    if name == "frac" and pos:
        return "/".join(pos)
    if name in ("c.", "circa") and pos:
        return "c. " + pos[0]
    if name.startswith("lang-") and pos:
        return pos[-1]
    if name in _KEEP_FIRST and pos:
        return pos[0]
    if name in _KEEP_LAST and pos:
        return pos[-1]
    return ""


def _render_link(body: str) -> str:
    target, _, label = body.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is an ordinary link to that page
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip()
        if prefix.lower() in _DROP_LINK_PREFIXES:
            return ""
        if re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)*|simple", prefix):
            return ""  # interlanguage link ([[de:Boston]])
        if prefix.lower() in _SISTER_PREFIXES and not label:
            target = target.split(":", 1)[1]
    if "|" in body:
        # pipe trick [[Foo (bar)|]] shows "Foo"; otherwise the label is shown
        return label if label.strip() else re.sub(r"\s*\(.*\)$", "", target)
    return target


def _sub_innermost(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _clean_line(line: str) -> str:
    line = re.sub(r"'''''|'''|''", "", line)  # bold / italic
    line = _TAG.sub(lambda m: " " if m.group().lower().startswith("<br") else "", line)
    line = _MAGIC.sub("", line)
    line = html.unescape(line).replace("\u00a0", " ").replace("\u200b", "")
    line = re.sub(r"[ \t\u2009\u202f]+", " ", line)
    # holes left by dropped templates/refs: "( ; born ...)", "()", "word ,"
    line = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", line)
    line = re.sub(r"\s*[,;:]+\s*\)", ")", line)
    line = re.sub(r"\s*\(\s*\)", "", line)
    line = re.sub(r" +([,.;:!?)\]])", r"\1", line)
    line = re.sub(r"([(\[]) +", r"\1", line)
    line = re.sub(r",(?:\s*,)+", ",", line)
    return line.strip()


def clean_wikitext(markup: str) -> str:
    """Wikitext of one article -> plain prose, paragraphs separated by blank lines."""
    t = _COMMENT.sub("", markup)
    t = _REF_SELF.sub("", t)
    t = _REF.sub("", t)
    t = _SELF_CLOSING.sub("", t)
    # keep trivial formulas ("where <math>A</math> is the albedo"), drop real TeX
    t = _MATH.sub(lambda m: "" if "\\" in m.group(1) else re.sub(r"[{}]", "", m.group(1)).strip(), t)
    t = _sub_innermost(_DROP_TAG, "", t)
    t = _sub_innermost(_TEMPLATE, lambda m: _render_template(m.group(1)), t)
    t = _sub_innermost(_TABLE, "", t)
    t = re.sub(r"\{\{.*?(?:\}\}|\Z)|\{\|.*?(?:\|\}|\Z)", "", t, flags=re.S)  # unbalanced leftovers
    t = _EXTLINK.sub(lambda m: m.group(1) or "", t)
    t = _sub_innermost(_LINK, lambda m: _render_link(m.group(1)), t)
    t = t.replace("[[", "").replace("]]", "")

    # Sections: (level, heading, lines); level 0 is the lead.
    sections: list[tuple[int, str, list[str]]] = [(0, "", [])]
    for raw in t.split("\n"):
        m = _HEADING.match(raw.strip())
        if m:
            sections.append((len(m.group(1)), _clean_line(m.group(2)), []))
        else:
            sections[-1][2].append(raw)

    blocks: list[tuple[int, str, str]] = []  # (level, heading, body) after dropping sections
    drop_level = None
    for level, head, lines in sections:
        if drop_level is not None and level > drop_level:
            continue  # subsection of a dropped section
        drop_level = level if head.lower().rstrip(":") in DROP_SECTIONS else None
        if drop_level is None:
            blocks.append((level, head, _paragraphs(lines)))

    out = []
    for i, (level, head, body) in enumerate(blocks):
        # keep a heading only if it heads some text (its own or a subsection's)
        if head:
            j = i + 1
            while j < len(blocks) and blocks[j][0] > level:
                j += 1
            if any(b for _, _, b in blocks[i:j]):
                out.append(head)
        if body:
            out.append(body)
    return "\n\n".join(out)


def _paragraphs(lines: list[str]) -> str:
    """Lines of one section -> paragraphs. As MediaWiki renders it, consecutive text lines form
    one paragraph and an empty line ends it; list items are kept one per line."""
    paras: list[tuple[bool, list[str]]] = []  # (is_list, lines)
    prev = None  # kind of the previous line: None (break), True (list item), False (text)
    for raw in lines:
        s = raw.strip()
        if not s or re.fullmatch(r"-{4,}", s) or s[0] in "|!":  # rule or table debris
            prev = None
            continue
        is_list = s[0] in "*#:;"
        s = _clean_line(re.sub(r"^[*#:;]+\s*", "", s))
        if not s or not re.search(r"\w", s):
            continue
        if prev is is_list:
            paras[-1][1].append(s)
        else:
            paras.append((is_list, [s]))
        prev = is_list
    return "\n\n".join(("\n" if is_list else " ").join(p) for is_list, p in paras)


# --- calibration / evaluation split ---------------------------------------------------------


def split_articles(articles: list[tuple[str, str]], calib_frac: float = 0.6
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic split by article: order by sha256(title), fill the calibration part up
    to `calib_frac` of all characters, the rest is the evaluation part."""
    order = sorted(articles, key=lambda a: hashlib.sha256(a[0].encode("utf-8")).hexdigest())
    total = sum(len(text) for _, text in order)
    calib, evals, n = [], [], 0
    for title, text in order:
        if n < calib_frac * total:
            calib.append((title, text))
            n += len(text)
        else:
            evals.append((title, text))
    return calib, evals


def _norm_space(s: str) -> str:
    return re.sub(r"[ \t]+", " ", s.replace("\u00a0", " ")).strip()


def lambada_passages(requests: list[dict]) -> list[str]:
    """Whole LAMBADA passages (context + target word), in file order, duplicates dropped."""
    seen, out = set(), []
    for r in requests:
        p = _norm_space(r["request"]["context"] + r["request"]["continuation"])
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def split_by_hash(items: list[str], calib_frac: float = 0.5) -> tuple[list[str], list[str]]:
    """Deterministic split of passages: sha256 of the text, the lowest calib_frac go to calibration."""
    keyed = sorted(items, key=lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest())
    n = int(round(calib_frac * len(keyed)))
    return keyed[:n], keyed[n:]


def coqa_stories(requests: list[dict], source: str) -> list[str]:
    """Distinct CoQA stories of one source (cnn, gutenberg, race, mctest, wikipedia), first-seen order.
    Paragraph breaks inside a story are kept as single newlines."""
    seen, out = set(), []
    for r in requests:
        d = r["doc"]
        if d.get("source") != source:
            continue
        s = "\n".join(_norm_space(line) for line in d["story"].split("\n") if line.strip())
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


_QASPER_REF = re.compile(r"\s*\b(?:[A-Z]*REF|INLINEFORM|DISPLAYFORM)\d+\b")


def qasper_papers(requests: list[dict]) -> list[str]:
    """One text per distinct Qasper paper: title, abstract, then each section's heading and its
    paragraphs; citation/figure placeholders (BIBREF12, ...) removed, formula placeholders too."""
    seen, out = set(), []
    for r in requests:
        d = r["doc"]
        if d["title"] in seen:
            continue
        seen.add(d["title"])
        parts = [_norm_space(d["title"]), _norm_space(d["abstract"])]
        ft = d["full_text"]
        for head, paras in zip(ft["section_name"], ft["paragraphs"]):
            body = [_norm_space(_QASPER_REF.sub("", p).replace("\n", " ")) for p in paras]
            body = [p for p in body if len(p.split()) >= 5]  # drop table debris and stray labels
            if body:
                if head:
                    parts.append(_norm_space(head))
                parts += body
        out.append("\n\n".join(p for p in parts if p))
    return out
