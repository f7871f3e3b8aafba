"""A zero-shot task for `--tasks`: sentence completion on a held-out Austen novel (multiple choice).

`python -m jobs.austen_cloze --out DIR [--book persuasion] [--items 400] [--seed 0]` writes DIR/austen_cloze.jsonl
and DIR/austen_cloze.yaml (an lm-evaluation-harness multiple-choice task over that file) and prints the
YAML's path; pass it to `python -m jobs.prune --tasks DIR/austen_cloze.yaml`.

Each item is the first 15-40 words of a sentence; the right choice is the sentence's next 4-8 words, up
to a punctuation mark; the three wrong choices are spans of the same length, ending in the same mark,
from other sentences of the same book. All four choices are fluent Austen, so only the context tells
them apart. The default book, Persuasion, is neither the calibration text (Pride and Prejudice) nor
the perplexity text (Emma). The same arguments always give byte-identical files; fewer --items
with the same seed are the first items of more. Cost: lm-eval scores 4 choices per item, about
0.37 s per item per model for SmolLM2-135M on one CPU core (400 items: ~150 s per model).
Bad input ends with a one-line error and exit status 2; nothing is written.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from jobs.prune import _Parser  # one-line errors, exit 2
from pipeline import assets
from pipeline.remote import _atomic_write

TASK = "austen_cloze"
CONTEXT_WORDS = (15, 40)  # enough context to pin down the continuation, short enough to score fast
ANSWER_WORDS = (4, 8)
CHOICES = 4
BREAKS = ",;:.!?"  # a span ends at one of these, so it is a phrase, not a cut mid-phrase
# Spans with quotes, dashes or brackets would carry surface cues (an unbalanced quote fits one context
# and not another), so they are never a choice; contexts may hold them.
NOT_IN_SPAN = re.compile(r'["\'()\[\]_]|--')
ABBREV = ("Mr.", "Mrs.", "Dr.", "St.", "Esq.", "Capt.", "Col.")
HEADING = re.compile(r"^(chapter|volume|book)\b|^(finis|the end)$", re.I)


class ClozeError(ValueError):
    pass


def sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences, paragraph by paragraph (a sentence never spans two)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para or HEADING.match(para):
            continue
        pieces = re.split(r'(?<=[.!?])\s+|(?<=[.!?]")\s+', para)
        merged: list[str] = []
        for p in pieces:
            # "Oh! how ..." and "Mr. Elliot" are one sentence: merge where the split was not a sentence end
            if merged and (merged[-1].endswith(ABBREV) or not re.match(r'["\']?[A-Z]', p)):
                merged[-1] += " " + p
            else:
                merged.append(p)
        out += merged
    return out


def span_end(words: list[str], k: int) -> int | None:
    """Length n of the shortest span words[k:k+n] in ANSWER_WORDS that ends at a break, if it is plain."""
    lo, hi = ANSWER_WORDS
    for n in range(lo, hi + 1):
        if k + n > len(words):
            return None
        if words[k + n - 1][-1] in BREAKS:
            span = " ".join(words[k:k + n])
            return n if not NOT_IN_SPAN.search(span) else None
    return None


def candidates(sentence: str) -> list[tuple[int, int]]:
    """(context words k, answer words n) for every usable cut of one sentence."""
    words = sentence.split()
    lo, hi = CONTEXT_WORDS
    out = []
    for k in range(lo, min(hi, len(words) - ANSWER_WORDS[0]) + 1):
        n = span_end(words, k)
        if n:
            out.append((k, n))
    return out


def build(text: str, seed: int) -> list[dict]:
    """Every item the text yields, in an order shuffled by `seed` (so fewer items are a prefix)."""
    rng = random.Random(seed)
    sents = sentences(text)
    cuts = [candidates(s) for s in sents]
    # distractor pool: every usable span of every sentence, keyed by (length, final mark) so that the
    # right choice is not the only one of its length or ending
    pool: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for i, (s, cs) in enumerate(zip(sents, cuts)):
        words = s.split()
        for k, n in cs:
            span = " ".join(words[k:k + n])
            pool.setdefault((n, span[-1]), []).append((i, span))
    order = [i for i, cs in enumerate(cuts) if cs]
    rng.shuffle(order)
    items, seen = [], set()
    for i in order:
        words = sents[i].split()
        k, n = rng.choice(cuts[i])
        context, answer = " ".join(words[:k]), " ".join(words[k:k + n])
        if context.lower() in seen:  # a sentence the book repeats would be the same question twice
            continue
        group = pool[(n, answer[-1])]
        taken, wrong = {answer.lower()}, []
        for _ in range(50):  # a few draws suffice; a group too small to fill is skipped, not looped on
            j, span = group[rng.randrange(len(group))]
            if j != i and span.lower() not in taken:
                taken.add(span.lower())
                wrong.append(span)
                if len(wrong) == CHOICES - 1:
                    break
        if len(wrong) < CHOICES - 1:
            continue
        seen.add(context.lower())
        label = rng.randrange(CHOICES)
        items.append({"context": context, "choices": wrong[:label] + [answer] + wrong[label:], "label": label})
    return items


def task_yaml(rows: Path, task: str = TASK, text: str = "context") -> str:
    """An lm-eval multiple-choice task over a JSONL of {text, choices, label} rows."""
    # the path as a JSON string is a valid double-quoted YAML scalar, whatever characters it holds;
    # lm-eval puts its default target delimiter " " between context and each choice
    return f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(rows))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{{text}}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def make(out: str | Path, book: str = "persuasion", items: int = 400, seed: int = 0) -> Path:
    """Write the task into `out`; return the YAML's path. Checks everything before writing anything."""
    if book not in assets.BOOKS:
        raise ClozeError(f"unknown book {book!r}; choose one of {', '.join(assets.BOOKS)}")
    if items < 1:
        raise ClozeError(f"--items must be at least 1, got {items}")
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ClozeError(f"--out {out} exists and is not a folder")
    try:
        text = assets.austen(book).read_text(encoding="utf-8")
    except assets.AssetError as e:
        raise ClozeError(str(e)) from None
    found = build(text, seed)
    if items > len(found):
        raise ClozeError(f"{book} yields {len(found)} items with seed {seed}; ask for at most that many")
    out.mkdir(parents=True, exist_ok=True)
    rows, yaml = out / f"{TASK}.jsonl", out / f"{TASK}.yaml"
    _atomic_write(rows, "".join(json.dumps(x) + "\n" for x in found[:items]).encode())
    _atomic_write(yaml, task_yaml(rows).encode())  # last: a YAML that exists always points at a complete file
    return yaml


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m jobs.austen_cloze", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for austen_cloze.jsonl and austen_cloze.yaml")
    p.add_argument("--book", default="persuasion", help=f"one of {', '.join(assets.BOOKS)} (default persuasion: "
                   "neither the default calibration nor the default evaluation text)")
    p.add_argument("--items", type=int, default=400, help="number of questions (default 400)")
    p.add_argument("--seed", type=int, default=0,
                   help="which sentences, cuts, distractors and label positions (default 0)")
    a = p.parse_args(argv)
    try:
        print(make(a.out, a.book, a.items, a.seed))
    except ClozeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
