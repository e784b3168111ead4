"""chess_gguf.data and scripts/corpus.py: wikitext cleaning on handwritten snippets, and the files `make data` builds."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # uninstalled checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # corpus.py: the cleaning
import corpus as C  # noqa: E402
from chess_gguf import data as D  # noqa: E402

# --- clean_wikitext -------------------------------------------------------------------------


def test_nested_templates_and_infobox():
    markup = ("{{Infobox person\n| name = X\n| birth = {{birth date|1900|1|2}}\n| image = {{!}}\n}}\n"
              "Paris{{efn|a note {{citation needed|date=May 2010}} here}} is big.{{sfn|Smith|2001|p=3}}")
    assert C.clean_wikitext(markup) == "Paris is big."


def test_inline_templates_render():
    assert C.clean_wikitext("It is {{convert|5|km|mi}} long, {{lang|fr|très}} {{nowrap|long}}.") == \
        "It is 5 km long, très long."
    assert C.clean_wikitext("Born {{birth date|1900|1|2}}, in Rome.") == "Born 2 January 1900, in Rome."


def test_links():
    assert C.clean_wikitext("[[Paris|the capital]] of [[France]] has [[cat]]s and [[:Category:Cities|cities]].") == \
        "the capital of France has cats and cities."
    # category and interlanguage links vanish; a pipe trick shows the bare title
    assert C.clean_wikitext("Text [[Boston (band)|]].\n[[Category:Bands]]\n[[de:Boston]]") == "Text Boston."


def test_refs_and_comments():
    markup = ('One.<ref name="a">{{cite web|url=http://x|title=T}}</ref> Two.<ref name=a /> '
              'Three<!-- hidden\ncomment -->.<ref>plain [[link]] ref</ref>')
    assert C.clean_wikitext(markup) == "One. Two. Three."


def test_file_links_with_nested_links_in_caption():
    markup = ("[[File:Cat.jpg|thumb|left|A [[cat]] on a [[mat|rug]], see [http://x.org here].]]"
              "The cat sat.\n[[Image:Dog.png|frame|[[Dog]]s [[bark]]]] Dogs bark.")
    assert C.clean_wikitext(markup) == "The cat sat. Dogs bark."


def test_tables_nested_and_html():
    markup = ("Before.\n{| class=\"wikitable\"\n|-\n! A !! B\n|-\n| 1 || {|\n| inner\n|}\n|}\n"
              "<table><tr><td>cell</td></tr></table>\nAfter.")
    assert C.clean_wikitext(markup) == "Before.\n\nAfter."  # a table ends the paragraph


def test_entities_markup_and_external_links():
    markup = ("'''Bold''' and ''italic'' A&nbsp;B &amp; C&mdash;D &lt;x&gt;; "
              "[http://example.org the site] and [https://bare.example.org].<br/>End<sup>2</sup>.")
    assert C.clean_wikitext(markup) == "Bold and italic A B & C—D <x>; the site and. End2."


def test_sections_headings_lists_and_paragraphs():
    markup = ("Lead line one\ncontinues here.\n\nSecond paragraph.\n"
              "== History ==\n=== Early ===\n* item ''one''\n* item two\n# numbered\n"
              "== Empty ==\n{{main|Somewhere}}\n"
              "== Notes ==\n=== Sub note ===\nnote text\n"
              "== Life ==\nLived.\n----\n"
              "== See also ==\n* [[Other]]\n== References ==\n{{reflist}}\n== External links ==\n* [http://x y]")
    assert C.clean_wikitext(markup) == (
        "Lead line one continues here.\n\nSecond paragraph.\n\nHistory\n\nEarly\n\n"
        "item one\nitem two\nnumbered\n\nLife\n\nLived.")


def test_iter_pages_skips_redirects_and_other_namespaces():
    xml = b"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
      <page><title>Real</title><ns>0</ns><revision><text>Some '''text'''.</text></revision></page>
      <page><title>Old</title><ns>0</ns><redirect title="Real"/><revision><text>#REDIRECT [[Real]]</text></revision></page>
      <page><title>Wikipedia:Help</title><ns>4</ns><revision><text>Help.</text></revision></page>
      <page><title>Sneaky</title><ns>0</ns><revision><text>#redirect [[Real]]</text></revision></page>
    </mediawiki>"""
    assert list(C.iter_pages(xml)) == [("Real", "Some '''text'''.")]


def test_split_articles_deterministic_and_by_characters():
    arts = [(f"T{i}", "x" * (100 + 37 * i)) for i in range(50)]
    calib, evals = C.split_articles(arts, 0.6)
    assert C.split_articles(list(reversed(arts)), 0.6) == (calib, evals)  # order-independent
    assert {t for t, _ in calib}.isdisjoint(t for t, _ in evals) and len(calib) + len(evals) == 50
    frac = sum(len(x) for _, x in calib) / sum(len(x) for _, x in arts)
    assert 0.6 <= frac < 0.65


def test_missing_data_says_make_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESS_GGUF_DATA", str(tmp_path / "nowhere"))
    assert D.default_data_dir() == tmp_path / "nowhere"
    for fn in (D.default_calib_path, D.default_eval_path, lambda: D.load_task("piqa")):
        with pytest.raises(FileNotFoundError, match="make data"):
            fn()


# --- the built data/ ------------------------------------------------------------------------

DATA = D.default_data_dir()
built = pytest.mark.skipif(not (DATA / ".complete").is_file(),
                           reason=f"{DATA} not built: run `make data`")
EXPECTED_QUESTIONS = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042,
                      "openbookqa": 500, "piqa": 1838, "sciq": 1000, "winogrande": 1267}
LEFTOVER_MARKUP = ["{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "<!--", "&nbsp;", "&amp;",
                   "'''", "thumb|", "[http", "__TOC__", "<br"]


@built
def test_wiki_split_disjoint_and_proportioned():
    split = json.loads((DATA / "wiki_split.json").read_text())
    calib_titles, eval_titles = set(split["calib"]), set(split["eval"])
    assert calib_titles.isdisjoint(eval_titles)
    assert len(calib_titles) + len(eval_titles) == 106
    calib, evals = D.default_calib_path().read_text(), D.default_eval_path().read_text()
    assert 0.55 <= len(calib) / (len(calib) + len(evals)) <= 0.65
    # by article, so no paragraph of one part shows up in the other
    calib_paras = {p for p in calib.split("\n\n") if len(p) > 100}
    assert not [p for p in evals.split("\n\n") if len(p) > 100 and p in calib_paras]


@built
@pytest.mark.parametrize("name", ["wiki_calib.txt", "wiki_eval.txt"])
def test_wiki_text_is_clean_prose(name):
    text = (DATA / name).read_text()
    assert len(text) > 500_000
    for bad in LEFTOVER_MARKUP:
        assert bad not in text, f"{name} contains {bad!r}"
    assert "\n\n\n" not in text and "  " not in text
    words = text.split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.75  # mostly ordinary words


@built
@pytest.mark.parametrize("task", D.TASKS)
def test_task_file(task):
    records = D.load_task(task)
    n = EXPECTED_QUESTIONS[task]
    assert 0.9 * n <= len(records) <= 1.1 * n
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids) and all(type(i) is int and 0 <= i < 1_000_000 for i in ids)
    for r in records:
        if task == "winogrande":
            assert set(r) == {"id", "contexts", "continuation", "gold"}
            options = r["contexts"]
            assert isinstance(r["continuation"], str) and r["continuation"].startswith(" ")
        else:
            assert set(r) == {"id", "context", "choices", "gold"}
            options = r["choices"]
            assert isinstance(r["context"], str) and r["context"]
            assert all(c.startswith(" ") for c in options)
        assert isinstance(options, list) and len(options) >= 2
        assert all(isinstance(o, str) and o.strip() for o in options)
        assert type(r["gold"]) is int and 0 <= r["gold"] < len(options)
    if task != "sciq":  # sciq, as in the harness, always lists the correct answer last
        assert len({r["gold"] for r in records}) > 1


@built
def test_task_formats_match_the_harness():
    first = {t: D.load_task(t)[0] for t in D.TASKS}
    assert first["arc_easy"]["context"].startswith("Question: ") and first["arc_easy"]["context"].endswith("\nAnswer:")
    assert first["arc_easy"]["context"].count("Question: ") == 1  # no few-shot prefix
    assert first["piqa"]["context"].startswith("Question: ")
    assert not first["openbookqa"]["context"].startswith("Question: ")
    assert first["boolq"]["choices"] == [" no", " yes"] and "\nQuestion: " in first["boolq"]["context"]
    w = first["winogrande"]
    assert w["contexts"][0] != w["contexts"][1] and "_" not in w["contexts"][0]


# --- more text domains (issue #9) -------------------------------------------------------------


def test_domain_builders_on_handmade_records():
    lam = [{"request": {"context": "He  opened the\u00a0door and saw", "continuation": " Anna"}},
           {"request": {"context": "He opened the door and saw", "continuation": " Anna"}},  # same passage
           {"request": {"context": "Rain fell.", "continuation": " Again"}}]
    assert C.lambada_passages(lam) == ["He opened the door and saw Anna", "Rain fell. Again"]
    coqa = [{"doc": {"source": "cnn", "story": "(CNN) -- A  b.\n\nC d."}},
            {"doc": {"source": "cnn", "story": "(CNN) -- A  b.\n\nC d."}},
            {"doc": {"source": "race", "story": "Other."}}]
    assert C.coqa_stories(coqa, "cnn") == ["(CNN) -- A b.\nC d."]
    qas = [{"doc": {"title": "T", "abstract": "Abs.", "full_text": {
        "section_name": ["Intro", "Table"],
        "paragraphs": [["We use BERT BIBREF12 , and\nmore words UNKREF3 here.", "short"], ["1 2"]]}}},
           {"doc": {"title": "T", "abstract": "dup", "full_text": {"section_name": [], "paragraphs": []}}}]
    assert C.qasper_papers(qas) == ["T\n\nAbs.\n\nIntro\n\nWe use BERT , and more words here."]
    items = [f"p{i}" for i in range(10)]
    c1, e1 = C.split_by_hash(items, 0.5)
    assert (c1, e1) == C.split_by_hash(list(reversed(items)), 0.5)  # order-independent
    assert len(c1) == 5 and set(c1).isdisjoint(e1) and set(c1) | set(e1) == set(items)
    with pytest.raises(ValueError, match="unknown text domain"):
        D.domain_path("poetry")


@built
@pytest.mark.parametrize("name", ["books", "news", "science"])
def test_domain_text_files(name):
    text = D.domain_path(name).read_text()
    assert len(text) > 100_000 and "\n\n\n" not in text and "REF1" not in text
    words = text.split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.6
    if name == "books":  # calibration and evaluation halves share no passage
        calib = set(D.calib_domain_path("books").read_text().split("\n\n"))
        assert not calib & set(text.split("\n\n"))
