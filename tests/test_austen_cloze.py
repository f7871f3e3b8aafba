"""jobs.austen_cloze: the held-out multiple-choice task for `--tasks` (files only; no model runs here)."""
from __future__ import annotations

import json

import pytest

from jobs import austen_cloze
from pipeline import assets


def run(argv, capsys):
    """(exit status, stdout, stderr) of the CLI; argparse's own errors exit instead of returning."""
    capsys.readouterr()
    try:
        code = austen_cloze.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def items_of(folder):
    return [json.loads(line) for line in (folder / "austen_cloze.jsonl").read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_other_items(tmp_path, capsys):
    files = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        code, out, err = run(["--out", str(tmp_path / name), "--items", "50", "--seed", str(seed)], capsys)
        assert code == 0 and err == ""
        assert out.strip() == str(tmp_path / name / "austen_cloze.yaml")
        files[name] = [(tmp_path / name / f).read_bytes() for f in ("austen_cloze.jsonl", "austen_cloze.yaml")]
    assert files["a"][0] == files["b"][0]
    # the YAMLs differ only by the folder they name
    assert files["a"][1].replace(b"/a/", b"/b/") == files["b"][1]
    a, c = items_of(tmp_path / "a"), items_of(tmp_path / "c")
    assert {x["context"] for x in a} != {x["context"] for x in c}


def test_items_are_well_formed_and_from_the_book(tmp_path, capsys):
    n = 300
    assert run(["--out", str(tmp_path), "--items", str(n)], capsys)[0] == 0
    items = items_of(tmp_path)
    assert len(items) == n
    book = " ".join(assets.austen("persuasion").read_text(encoding="utf-8").split())
    labels, contexts = set(), set()
    for x in items:
        choices, label = x["choices"], x["label"]
        assert len(choices) == 4 and len({c.lower() for c in choices}) == 4, x
        assert isinstance(label, int) and 0 <= label < 4
        labels.add(label)
        ctx_words, answer_words = len(x["context"].split()), [len(c.split()) for c in choices]
        assert 15 <= ctx_words <= 40 and len(set(answer_words)) == 1 and 4 <= answer_words[0] <= 8, x
        assert x["context"] + " " + choices[label] in book, x  # the context and its true next words
        assert all(c in book for c in choices)  # the wrong choices are Austen's words too
        assert not x["context"].lower().startswith("chapter")
        contexts.add(x["context"])
    assert len(contexts) == n  # no question twice
    assert labels == {0, 1, 2, 3}  # the right answer is not always in the same place


def test_fewer_items_are_a_prefix(tmp_path, capsys):
    assert run(["--out", str(tmp_path / "small"), "--items", "20"], capsys)[0] == 0
    assert run(["--out", str(tmp_path / "big"), "--items", "60"], capsys)[0] == 0
    assert items_of(tmp_path / "big")[:20] == items_of(tmp_path / "small")


def test_sentences_split_where_austen_ends_them():
    text = ("Chapter 1\n\n\nMr. Elliot came in.  \"Oh! how glad I am,\" said Anne.\nShe sat\ndown again.\n\n"
            "CHAPTER II\n\nIt rained? Yes.\n")
    assert austen_cloze.sentences(text) == ["Mr. Elliot came in.", "\"Oh! how glad I am,\" said Anne.",
                                            "She sat down again.", "It rained?", "Yes."]


def test_the_task_resolves_in_lm_eval(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from pipeline import zeroshot
    # a local JSON file needs no hub: say so, so the check does not probe the network first
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, _ = run(["--out", str(tmp_path), "--items", "12"], capsys)
    assert code == 0
    names, tm = zeroshot.resolve([out.strip()])  # reads the data through lm-eval's own loader
    assert names == ["austen_cloze"]
    task = tm.load(["austen_cloze"])["tasks"]["austen_cloze"]
    docs = list(task.test_docs())
    mine = items_of(tmp_path)
    assert len(docs) == 12
    for doc, x in zip(docs, mine):
        assert task.doc_to_text(doc) == x["context"]
        assert task.doc_to_choice(doc) == x["choices"] and task.doc_to_target(doc) == x["label"]


@pytest.mark.parametrize("argv, needle", [
    (["--book", "ulysses"], "unknown book 'ulysses'"),
    (["--items", "0"], "--items must be at least 1"),
    (["--items", "100000"], "ask for at most"),
    (["--items", "many"], "invalid int value"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "task"
    code, stdout, err = run(["--out", str(out)] + argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0], lines
    assert not out.exists()
