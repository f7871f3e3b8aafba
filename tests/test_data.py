"""Data sources (files, dataset folders, hub ids), C4-style calibration, and the papers' perplexity
protocol, checked by hand-computed token counts and against a plain transformers loop."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from jobs.prune import main
from pipeline import data

PARAS = [f"Paragraph {i}: " + " ".join(["word"] * (5 + 7 * i)) for i in range(12)]


@pytest.fixture(scope="module")
def tok(real_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(real_model_dir)


def dataset_dict(train, test):
    from datasets import Dataset, DatasetDict
    return DatasetDict({"train": Dataset.from_dict({"body": train, "n": list(range(len(train)))}),
                        "test": Dataset.from_dict({"body": test, "n": list(range(len(test)))})})


def texts_of(docs: data.Documents) -> list[str]:
    return [docs[i] for i in range(len(docs))]


# --- sources ---------------------------------------------------------------------------------

def test_dataset_folder_kinds_and_default_splits(tmp_path):
    dd = dataset_dict(PARAS[:8], PARAS[8:])
    dd.save_to_disk(tmp_path / "saved")
    dd["test"].save_to_disk(tmp_path / "single")
    (tmp_path / "pq").mkdir()
    dd["train"].to_parquet(tmp_path / "pq" / "train-00000-of-00001.parquet")
    dd["test"].to_parquet(tmp_path / "pq" / "test-00000-of-00001.parquet")
    (tmp_path / "js").mkdir()
    dd["train"].to_json(tmp_path / "js" / "part1.jsonl")  # no split in the names: one split, train
    (tmp_path / "arrow").mkdir()
    import pyarrow as pa
    table = pa.table({"body": PARAS[:8]})
    with pa.ipc.new_stream(str(tmp_path / "arrow" / "data.arrow"), table.schema) as w:
        w.write_table(table)
    for folder in ("saved", "pq"):
        calib = data.load_documents(tmp_path / folder, "body", "calib")
        ev = data.load_documents(tmp_path / folder, "body", "eval")
        assert (calib.split, texts_of(calib)) == ("train", PARAS[:8])  # calibration: train
        assert calib.texts() == texts_of(calib)
        assert (ev.split, texts_of(ev)) == ("test", PARAS[8:])          # evaluation: the whole test split
        assert texts_of(data.load_documents(f"{tmp_path / folder}:train", "body", "eval")) == PARAS[:8]
    assert texts_of(data.load_documents(tmp_path / "single", "body", "eval")) == PARAS[8:]
    assert texts_of(data.load_documents(tmp_path / "js", "body", "eval")) == PARAS[:8]
    assert texts_of(data.load_documents(tmp_path / "arrow", "body", "eval")) == PARAS[:8]
    one = data.load_documents(tmp_path / "js" / "part1.jsonl", "body")
    assert one.kind == "records" and texts_of(one) == PARAS[:8]


def test_source_errors_name_file_split_and_column(tmp_path):
    dataset_dict(PARAS[:8], PARAS[8:]).save_to_disk(tmp_path / "saved")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet at all")
    cases = [
        (lambda: data.load_documents(tmp_path / "saved", "text"), ["'text'", "split test", "body", "--text-field"]),
        (lambda: data.load_documents(f"{tmp_path / 'saved'}:dev", "body"), ["'dev'", "train, test"]),
        (lambda: data.load_documents(tmp_path / "empty", "text"), [str(tmp_path / "empty")]),
        (lambda: data.load_documents(tmp_path / "bad", "text"), [str(tmp_path / "bad" / "x.parquet")]),
        (lambda: data.load_documents(tmp_path / "nope" / "c4.jsonl"), ["not found", "c4.jsonl"]),
        (lambda: data.load_documents("./relative/missing"), ["not found", "relative/missing"]),
    ]
    for call, needles in cases:
        with pytest.raises(data.DataError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg


def test_hub_ids_parse():
    assert data.parse_hub_id("wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert data.parse_hub_id("allenai/c4:en") == ("allenai/c4", "en", None)
    assert data.parse_hub_id("ptb_text_only::test") == ("ptb_text_only", None, "test")
    assert data.parse_hub_id("wikitext") == ("wikitext", None, None)
    for bad in ("a:b:c:d", "a b", "org/name/extra:x"):
        with pytest.raises(data.DataError):
            data.parse_hub_id(bad)


def test_cli_data_errors_are_one_line(tiny_model, short_texts, tmp_path, capsys):
    dataset_dict(PARAS[:8], PARAS[8:]).save_to_disk(tmp_path / "saved")
    model = tiny_model("llama")
    capsys.readouterr()  # the fixtures' progress bars
    base = ["--model", str(model), "--out", str(tmp_path / "out"), "--nsamples", "2", "--seqlen", "16",
            "--quiet"]
    for extra, needle in ((["--calib", str(tmp_path / "saved")], "'text'"),
                          (["--calib", str(tmp_path / "saved"), "--text-field", "body",
                            "--eval", f"{tmp_path / 'saved'}:dev"], "'dev'"),
                          (["--eval-protocol", "wikitext"], "wikitext")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()


# --- calibration: C4 style ---------------------------------------------------------------------

def test_document_windows_c4_style(tmp_path, tok):
    long_docs = [" ".join(f"w{i}x{j}" for j in range(60)) for i in range(4)]
    docs_list = ["short one", long_docs[0], "tiny", long_docs[1], long_docs[2], "", long_docs[3]]
    docs = data.Documents("mem", "dataset", "train", None, docs_list)
    seqlen, first = 48, 0
    w = data.document_windows(docs, tok, 40, seqlen, seed=3, first=first)
    assert w.shape == (40, seqlen) and (w[:, 0] == first).all()
    toks = [data.tokenize(tok, d).tolist() for d in docs_list]
    used = set()
    for row in w[:, 1:].tolist():  # every window is a contiguous slice of one long-enough document
        hits = [i for i, t in enumerate(toks) if any(t[s:s + len(row)] == row for s in range(len(t) - len(row) + 1))]
        assert len(hits) == 1 and len(toks[hits[0]]) >= seqlen, hits
        used.add(hits[0])
    assert used == {1, 3, 4, 6}  # all long documents drawn, short ones never (40 draws over 4: P(miss) < 1e-4)
    assert torch.equal(w, data.document_windows(docs, tok, 40, seqlen, seed=3, first=first))  # seeded
    assert not torch.equal(w, data.document_windows(docs, tok, 40, seqlen, seed=4, first=first))
    with pytest.raises(data.DataError, match="too short.*mem"):
        data.document_windows(docs, tok, 2, 500, seed=0, first=first)


def test_one_document_keeps_the_old_windows(short_texts, tok):
    """A text file is one document: exactly the windows of the random-offset sampler it replaced."""
    docs = data.load_documents(short_texts["calib"], "text", "calib")
    old = data.calibration_windows(data.tokenize(tok, data.read_text(short_texts["calib"])), 16, 64, 0, 5)
    assert torch.equal(data.document_windows(docs, tok, 16, 64, 0, 5), old)


# --- evaluation: the papers' protocol ----------------------------------------------------------

def bos_model(tiny_model, tmp_path):
    """The tiny llama with a tokenizer that adds `<|endoftext|>` as its own special token (as
    Llama's adds BOS), so the protocol's single tokenization with special tokens is visible."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer
    d = tmp_path / "bos-model"
    shutil.copytree(tiny_model("llama"), d)
    t = AutoTokenizer.from_pretrained(d)
    eot = t.convert_tokens_to_ids("<|endoftext|>")
    t._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eot)])
    t.save_pretrained(d)
    return d, AutoTokenizer.from_pretrained(d)


def test_papers_windows_hand_counted(tiny_model, tmp_path):
    _, t = bos_model(tiny_model, tmp_path)
    the, sp_the, nl = (t.convert_tokens_to_ids(x) for x in ("the", "Ġthe", "Ċ"))
    eot = t.convert_tokens_to_ids("<|endoftext|>")
    assert t("the the")["input_ids"] == [eot, the, sp_the]  # the facts the count below rests on
    assert t("the\n\nthe", add_special_tokens=False)["input_ids"] == [the, nl, nl, the]
    docs = ["the" + " the" * 9] * 5  # 10 tokens each
    text = data.joined_text(data.Documents("mem", "dataset", "test", None, docs))
    # by hand: 1 special token + 5 x 10 words + 4 separators x 2 newline tokens = 59 -> 7 windows of 8
    expected = [eot] + ([the] + [sp_the] * 9 + [nl, nl]) * 4 + [the] + [sp_the] * 9
    assert len(expected) == 59
    w = data.papers_windows(t, text, 8)
    assert w.shape == (7, 8)
    assert w.flatten().tolist() == expected[:56]  # the special token once, at the very start only
    assert data.papers_windows(t, text, 8, 3).tolist() == w[:3].tolist()
    with pytest.raises(data.DataError, match="too short"):
        data.papers_windows(t, text, 60)


def hf_perplexity(folder, windows: torch.Tensor) -> float:
    """The papers' loop, in plain transformers: each window's mean loss (its last seqlen-1 tokens)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            nll += model(w[None], labels=w[None]).loss.double().item() * (len(w) - 1)
    return math.exp(nll / (len(windows) * (windows.shape[1] - 1)))


def test_papers_protocol_end_to_end_matches_transformers(tiny_model, short_texts, tmp_path, capsys):
    model, t = bos_model(tiny_model, tmp_path)
    paras = [p for p in short_texts["eval"].read_text()[:6000].split("\n\n")]
    dataset_dict(PARAS, paras).rename_column("body", "content").save_to_disk(tmp_path / "evalset")
    out = tmp_path / "out"
    seqlen = 32
    argv = ["--model", str(model), "--out", str(out), "--calib", str(short_texts["calib"]), "--nsamples", "4",
            "--seqlen", str(seqlen), "--eval", str(tmp_path / "evalset"), "--text-field", "content",
            "--eval-protocol", "papers", "--quiet"]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    ev = rep["evaluation"]
    # the whole test split, joined and tokenized once: every full window of it
    ids = t("\n\n".join(paras))["input_ids"]
    n = len(ids) // seqlen
    assert (ev["protocol"], ev["split"], ev["windows"], ev["tokens_scored"]) == ("papers", "test", n, n * (seqlen - 1))
    windows = torch.tensor(ids[: n * seqlen]).view(n, seqlen)
    # Same float32 math in a different order (layer by layer vs the whole model): 1e-4 relative
    # covers summation-order differences, far below any protocol mistake (a shifted or extra
    # scored token moves perplexity by percent on a random model).
    assert rep["perplexity"]["dense"] == pytest.approx(hf_perplexity(model, windows), rel=1e-4)
    assert rep["perplexity"]["pruned"] == pytest.approx(hf_perplexity(out, windows), rel=1e-4)
    assert "perplexity dense" in capsys.readouterr().out


def test_windows_protocol_is_named_and_unchanged(tiny_model, short_texts, tmp_path, tok):
    from pipeline.run import RunConfig, prepare
    p = prepare(RunConfig(out=str(tmp_path / "o"), model=str(tiny_model("llama")), calib=str(short_texts["calib"]),
                          eval=str(short_texts["eval"]), nsamples=2, seqlen=32))
    first, _ = data.first_token_id(tok)
    old = data.eval_windows(data.tokenize(tok, data.read_text(short_texts["eval"])), 8, 32, first)
    assert torch.equal(p.evalw, old)  # the default is still 8 fixed-first-token windows
    assert p.eval_protocol["protocol"] == "windows" and p.eval_protocol["tokens_scored"] == 8 * 31
