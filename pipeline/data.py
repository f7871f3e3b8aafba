"""Calibration and evaluation text: read, tokenize, cut into windows.

Every window starts with one fixed first token (BOS, or `<|endoftext|>` where the tokenizer has
that convention) followed by seqlen-1 text tokens; the protocol dict says exactly what was done.
"""
from __future__ import annotations

from pathlib import Path

import torch


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


def file_digest(path: str | Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


__all__ = ["DataError", "read_text", "first_token_id", "tokenize", "calibration_windows", "eval_windows",
           "protocol", "file_digest", "batches"]
