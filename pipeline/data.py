"""Calibration and evaluation text: read, tokenize, cut into windows.

A source (`--calib`, `--eval`) is a text file (one document), a .jsonl/.json/.parquet/.arrow file
(one document per record), a local `datasets` folder (`save_to_disk`, or a folder of data files),
optionally `FOLDER:SPLIT`, or a hub id `NAME[:CONFIG][:SPLIT]`.

Calibration windows start with one fixed first token (BOS, or `<|endoftext|>` where the tokenizer
has that convention) followed by seqlen-1 tokens of one document (C4 style: a random document long
enough, a random window inside it). Evaluation joins the whole split's texts with "\n\n" and either
cuts today's fixed-first-token windows (`windows`) or follows SparseGPT/Wanda (`papers`): one
tokenization with the tokenizer's own special tokens, non-overlapping seqlen windows, each scored on
its last seqlen-1 tokens. The protocol dict says exactly what was done.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
EVAL_PROTOCOLS = ("windows", "papers")


class DataError(ValueError):
    pass


def read_text(path: str | Path) -> str:
    """Plain text (.txt or anything else), jsonl/json (field `text`) or parquet (column `text`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".parquet"):
            from datasets import load_dataset
            kind = "parquet" if suffix == ".parquet" else "json"
            ds = load_dataset(kind, data_files=str(path), split="train")
            if "text" not in ds.column_names:
                raise DataError(f"{path} has no 'text' column (columns: {', '.join(ds.column_names)})")
            text = "\n\n".join(t for t in ds["text"] if t)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - parse errors of any reader are one bad-input message
        raise DataError(f"unreadable data file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not text.strip():
        raise DataError(f"data file is empty: {path}")
    return text


def first_token_id(tokenizer) -> tuple[int, str]:
    """The token every window starts with: `<|endoftext|>` when the tokenizer has it and no real
    BOS (SmolLM2's BOS is a chat marker), else BOS, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab and tokenizer.bos_token in (None, "<|im_start|>", "<|endoftext|>"):
        return vocab["<|endoftext|>"], "<|endoftext|>"
    for tid, tok in ((tokenizer.bos_token_id, tokenizer.bos_token), (tokenizer.eos_token_id, tokenizer.eos_token)):
        if tid is not None:
            return tid, tok
    raise DataError("tokenizer has neither BOS nor EOS token to start windows with")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, first: int) -> torch.Tensor:
    """`nsamples` windows at random offsets (SparseGPT's sampling), seeded."""
    body = seqlen - 1
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples} seqlen={seqlen}")
    if len(tokens) < body + 1:
        raise DataError(f"calibration text too short: {len(tokens)} tokens, a window needs {body + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - body, (nsamples,), generator=g)
    out = torch.stack([tokens[s:s + body] for s in starts.tolist()])
    return torch.cat([torch.full((nsamples, 1), first, dtype=torch.long), out], dim=1)


def eval_windows(tokens: torch.Tensor, nwindows: int, seqlen: int, first: int) -> torch.Tensor:
    """The first `nwindows` non-overlapping windows of the text."""
    body = seqlen - 1
    if len(tokens) < nwindows * body:
        raise DataError(f"evaluation text too short: {len(tokens)} tokens for {nwindows} windows of {seqlen}")
    out = tokens[: nwindows * body].view(nwindows, body)
    return torch.cat([torch.full((nwindows, 1), first, dtype=torch.long), out], dim=1)


def protocol(path, nwindows, seqlen, first_tok, how) -> dict:
    return {"file": str(path), "windows": nwindows, "seqlen": seqlen, "first_token": first_tok,
            "sampling": how, "tokens_per_window_scored": seqlen - 1}


# -- sources: files, dataset folders, hub ids --------------------------------------------------

@dataclass
class Documents:
    """The texts of one split of a source, read lazily (a hub split may hold millions)."""
    source: str              # as the user gave it
    kind: str                # text | records | dataset | hub
    split: str | None
    field: str | None
    rows: object             # a list of str, or a datasets.Dataset

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        if self.field is None:
            return self.rows[i]
        return self.rows[i][self.field] or ""

    def texts(self) -> list[str]:
        """All of them, read as one column (row by row is slow on a large split)."""
        if self.field is None:
            return list(self.rows)
        return [t or "" for t in self.rows[self.field]]

    def where(self) -> str:
        return self.source + (f" (split {self.split})" if self.split else "")

    def describe(self) -> dict:
        return {"file": self.source, "source": self.kind, "split": self.split, "text_field": self.field,
                "documents": len(self)}


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 \
        or Path(spec).suffix.lower() in (*RECORD_SUFFIXES, ".txt")


def _pick_split(ds, where: str, split: str | None, role: str):
    """A split of a DatasetDict: the one asked for, else train for calibration and test, then
    validation, for evaluation, else the only one."""
    from datasets import DatasetDict, IterableDatasetDict
    if not isinstance(ds, (DatasetDict, IterableDatasetDict)):
        if split not in (None, str(getattr(ds, "split", None)), "train"):
            raise DataError(f"{where} is a single split; it has no split {split!r}")
        return ds, split
    names = list(ds)
    if split is None:
        prefer = ("train",) if role == "calib" else ("test", "validation")
        split = next((n for n in prefer if n in names), names[0] if len(names) == 1 else None)
        if split is None:
            raise DataError(f"{where}: which split? it has {', '.join(names)}; append :SPLIT")
    if split not in names:
        raise DataError(f"{where} has no split {split!r} (splits: {', '.join(names)})")
    return ds[split], split


def _with_field(ds, source: str, kind: str, split, field: str) -> Documents:
    docs = Documents(source, kind, split, field, ds)
    if field not in ds.column_names:
        raise DataError(f"{docs.where()} has no column {field!r} (columns: {', '.join(ds.column_names)}); "
                        f"name it with --text-field")
    if len(ds) == 0:
        raise DataError(f"data is empty: {docs.where()}")
    return docs


def load_documents(spec: str | Path, text_field: str = "text", role: str = "eval") -> Documents:
    """Read a source (see the module docstring). `role` picks the default split of a dataset with
    several: calib -> train; eval -> test, then validation. Every failure is one DataError that
    names the file, split or column."""
    spec = str(spec)
    from . import remote
    if remote.is_uri(spec):  # an object store: the file or dataset folder is fetched to this node's cache
        shown = remote.redact(spec)
        try:
            path, split = remote.fetch_data(spec)
        except remote.RemoteError as e:
            raise DataError(f"data {e}" if str(e).startswith(("not found", "bucket")) else str(e)) from None
        try:
            with _quiet_datasets():
                return _local(shown, path, split, text_field, role)
        except DataError as e:
            raise DataError(str(e).replace(str(path), shown)) from None
        except Exception as e:  # noqa: BLE001 - any reader's failure is one bad-input message
            raise DataError(f"unreadable data {shown}: {_first_line(e)}") from None
    path, split = Path(spec).expanduser(), None
    if not path.exists() and ":" in spec and Path(spec.rsplit(":", 1)[0]).expanduser().is_dir():
        path, split = Path(spec.rsplit(":", 1)[0]).expanduser(), spec.rsplit(":", 1)[1]  # FOLDER:SPLIT
    if not path.exists():
        if _looks_like_path(spec):
            raise DataError(f"data file not found: {spec}")
        return _hub(spec, text_field, role)
    try:
        with _quiet_datasets():  # local reads take a moment; bars and log lines would only clutter stderr
            return _local(spec, path, split, text_field, role)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader's failure is one bad-input message
        raise DataError(f"unreadable data {spec}: {_first_line(e)}") from None


def check_source(spec: str | Path) -> None:
    """The cheap part of `load_documents`' checks, reading nothing: a source that names a local path
    must exist (hub ids and readable files are checked when read)."""
    spec = str(spec)
    from . import remote
    if remote.is_uri(spec):
        return  # an object store: checked when fetched
    path = Path(spec).expanduser()
    if not path.exists() and ":" in spec and Path(spec.rsplit(":", 1)[0]).expanduser().is_dir():
        return  # FOLDER:SPLIT
    if not path.exists() and _looks_like_path(spec):
        raise DataError(f"data file not found: {spec}")


@contextlib.contextmanager
def _quiet_datasets():
    import datasets
    from datasets.utils import logging as dlog
    was, level = datasets.are_progress_bars_disabled(), dlog.get_verbosity()
    datasets.disable_progress_bars()
    dlog.set_verbosity(dlog.CRITICAL)  # a reader's own error log line would precede ours
    try:
        yield
    finally:
        if not was:
            datasets.enable_progress_bars()
        dlog.set_verbosity(level)


def _local(spec: str, path: Path, split: str | None, text_field: str, role: str) -> Documents:
    if path.is_file():
        builder = RECORD_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            return Documents(spec, "text", None, None, [read_text(path)])
        from datasets import load_dataset
        ds = load_dataset(builder, data_files=str(path), split="train")
        return _with_field(ds, spec, "records", None, text_field)
    import datasets
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in RECORD_SUFFIXES)
        if not files:
            raise DataError(f"no data files in folder {path} (neither save_to_disk output nor "
                            f"{', '.join(RECORD_SUFFIXES)} files)")
        try:
            ds = datasets.load_dataset(str(path))  # infers the format, and the splits from the file names
        except Exception as e:  # noqa: BLE001 - name the file that fails, when one fails alone
            for f in files:
                try:
                    datasets.load_dataset(RECORD_SUFFIXES[f.suffix.lower()], data_files=str(f), split="train")
                except Exception as fe:  # noqa: BLE001
                    raise DataError(f"unreadable data file {f}: {_first_line(fe)}") from None
            raise DataError(f"unreadable data folder {path}: {_first_line(e)}") from None
    ds, split = _pick_split(ds, spec, split, role)
    return _with_field(ds, spec, "dataset", split, text_field)


def parse_hub_id(spec: str) -> tuple[str, str | None, str | None]:
    """NAME[:CONFIG][:SPLIT] -> (name, config or None, split or None)."""
    parts = spec.split(":")
    if len(parts) > 3 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", parts[0]):
        raise DataError(f"not a file, folder or hub dataset id NAME[:CONFIG][:SPLIT]: {spec}")
    parts += [None] * (3 - len(parts))
    return parts[0], parts[1] or None, parts[2] or None


def _hub(spec: str, text_field: str, role: str) -> Documents:
    from datasets import load_dataset
    name, config, split = parse_hub_id(spec)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # retry chatter when the hub is unreachable; download bars stay
    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot load dataset {spec} (not a local file or folder; from the hub): {_first_line(e)}") from None
    finally:
        hub_log.setLevel(level)
    ds, split = _pick_split(ds, spec, split, role)
    return _with_field(ds, spec, "hub", split, text_field)


def document_windows(docs: Documents, tokenizer, nsamples: int, seqlen: int, seed: int, first: int) -> torch.Tensor:
    """C4-style calibration (SparseGPT's get_c4): per window, a random document with at least
    seqlen tokens (the fixed first token plus seqlen-1 of the document), then a random offset in it.
    Seeded. A single document is used as is (no draw), so a text file gives exactly the windows of
    `calibration_windows` on its tokens."""
    body = seqlen - 1
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples} seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    tokens: dict[int, torch.Tensor] = {}
    short: dict[int, int] = {}  # documents too short: their lengths
    out = []
    while len(out) < nsamples:
        if len(short) == len(docs):
            raise DataError(f"calibration text too short: {docs.where()}: no document has {body + 1} tokens "
                            f"(longest {max(short.values())}); lower --seqlen")
        i = 0 if len(docs) == 1 else int(torch.randint(0, len(docs), (1,), generator=g))
        if i in short:
            continue
        if i not in tokens:
            ids = tokenize(tokenizer, docs[i])
            if len(ids) < body + 1:  # as get_c4: longer than the window, so that offsets vary
                short[i] = len(ids)
                continue
            tokens[i] = ids
        t = tokens[i]
        s = int(torch.randint(0, len(t) - body, (1,), generator=g))
        out.append(t[s:s + body])
    return torch.cat([torch.full((nsamples, 1), first, dtype=torch.long), torch.stack(out)], dim=1)


def joined_text(docs: Documents) -> str:
    """The whole split as one text, records joined with "\n\n" verbatim (empty ones included), as
    SparseGPT and Wanda build WikiText-2's test text."""
    text = "\n\n".join(docs.texts())
    if not text.strip():
        raise DataError(f"data is empty: {docs.where()}")
    return text


def papers_windows(tokenizer, text: str, seqlen: int, nwindows: int | None = None) -> torch.Tensor:
    """SparseGPT/Wanda perplexity windows: the text tokenized once with the tokenizer's own special
    tokens, cut into non-overlapping windows of seqlen tokens (the tail that does not fill one is
    dropped); `nwindows` keeps only the first ones."""
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]  # add_special_tokens: the default
    n = len(ids) // seqlen
    if n < 1 or (nwindows is not None and n < nwindows):
        raise DataError(f"evaluation text too short: {len(ids)} tokens for {nwindows or 1} windows of {seqlen}")
    n = n if nwindows is None else nwindows
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


def windows_digest(windows: torch.Tensor) -> str:
    """What the calibration actually used, whatever its source."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


__all__ = ["DataError", "Documents", "EVAL_PROTOCOLS", "read_text", "first_token_id", "tokenize",
           "calibration_windows", "eval_windows", "protocol", "load_documents", "parse_hub_id",
           "document_windows", "joined_text", "papers_windows", "windows_digest", "file_digest", "batches"]
