"""Token classification (NER) helpers: CoNLL/JSONL reading, BIO repair, sub-token alignment, windows, spans.

All pure functions of lists, so each is tested on hand-made examples whose answer is known.
A sentence is a list of words (`tokens`) with one IOB2 tag per word (`tags`): O, B-TYPE, I-TYPE.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kftune.fileio import reading

IGNORE = -100  # label id the loss and the metrics skip (special tokens, non-first sub-tokens)


class NerDataError(ValueError):
    """Malformed NER input; the message names the file and line."""


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    line: int  # where the sentence starts in its file, for error messages
    lines: tuple = ()  # CoNLL: the line of every token, so an error names the token's own line


def _lines(path: str | Path, encoding: str) -> list[str]:
    """The file's lines, split at \\n (and \\r\\n) only: str.splitlines also splits at U+0085 (a cp1252 "..."
    read as latin-1), U+2028 (JSON may leave it unescaped) and form feeds, which belong to a token."""
    text = Path(path).read_text(encoding=reading(encoding))
    return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []


def read_conll(path: str | Path, tag_column: int, encoding: str = "utf-8") -> list[Sentence]:
    """One token per line, its tag in column `tag_column` (0-based; -1 is the last), blank lines between sentences.

    `-DOCSTART-` lines are skipped. Every non-blank line must have as many columns as the first.
    """
    sentences, tokens, tags, numbers, start, width = [], [], [], [], 0, None
    lines = _lines(path, encoding)
    for number, raw in enumerate(lines + [""], start=1):
        cols = raw.split("\t") if "\t" in raw else raw.split()
        if not raw.strip():
            if tokens:
                sentences.append(Sentence(tokens, tags, start, tuple(numbers)))
            tokens, tags, numbers = [], [], []
            continue
        if cols[0] == "-DOCSTART-":
            continue
        width = width or len(cols)
        if len(cols) != width or width < 2:
            raise NerDataError(f"{path}:{number}: expected {max(width, 2)} columns (token ... tag), got {len(cols)}: "
                               f"{raw!r}")
        try:
            tag = cols[tag_column]
        except IndexError:
            raise NerDataError(f"{path}:{number}: no column {tag_column} (ingest.conll_tag_column)") from None
        if not tokens:
            start = number
        tokens.append(cols[0])
        tags.append(tag.strip())
        numbers.append(number)
    return sentences


def read_jsonl(path: str | Path, encoding: str = "utf-8") -> list[Sentence]:
    """One {"tokens": [...], "tags": [...]} object per line."""
    sentences = []
    for number, raw in enumerate(_lines(path, encoding), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            tokens, tags = obj["tokens"], obj["tags"]
            if not isinstance(tokens, list) or not isinstance(tags, list):
                raise TypeError("'tokens' and 'tags' must be lists")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise NerDataError(f"{path}:{number}: expected a JSON object with 'tokens' and 'tags' lists: {exc}") from None
        if not tokens and not tags:
            continue  # an empty sentence, as a blank line is in CoNLL
        if len(tokens) != len(tags):
            raise NerDataError(f"{path}:{number}: {len(tokens)} tokens but {len(tags)} tags")
        sentences.append(Sentence([str(t) for t in tokens], [str(t) for t in tags], number))
    return sentences


def check_tags(sentence: Sentence, where: str, repair: bool, allowed: set[str] | None) -> int:
    """Validate IOB2 tags in place; an I-X that does not continue an X entity becomes B-X (repair) or fails.

    Returns the number of repairs.
    """
    repairs, previous = 0, "O"
    for i, tag in enumerate(sentence.tags):
        if sentence.lines:  # "file:line" of the token itself
            where = f"{where.rsplit(':', 1)[0]}:{sentence.lines[i]}"
        if tag != "O" and (len(tag) < 3 or tag[:2] not in ("B-", "I-")):
            raise NerDataError(f"{where}: tag {tag!r} of token {sentence.tokens[i]!r} is not O, B-TYPE or I-TYPE")
        if allowed is not None and tag not in allowed:
            raise NerDataError(f"{where}: unknown tag {tag!r} (token {sentence.tokens[i]!r}); ingest.labels allows "
                               f"{sorted(allowed)}")
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            if not repair:
                raise NerDataError(f"{where}: {tag!r} on token {sentence.tokens[i]!r} follows {previous!r}, not "
                                   f"B-{tag[2:]} or {tag}; set ingest.bio_repair=true to turn it into B-{tag[2:]}")
            sentence.tags[i] = tag = "B-" + tag[2:]
            repairs += 1
            if allowed is not None and tag not in allowed:
                raise NerDataError(f"{where}: I-{tag[2:]} on token {sentence.tokens[i]!r} repaired to {tag!r}, which "
                                   f"ingest.labels does not list ({sorted(allowed)}): add it")
        previous = tag
    return repairs


def tag_set(tags: list[str]) -> list[str]:
    """O, then B-/I- for every entity type seen, types sorted: the model can predict I-X even if unseen."""
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities as (type, first word, last word + 1); a stray I-X starts a new entity, as seqeval does."""
    out, current = [], None
    for i, tag in enumerate(tags + ["O"]):
        if current and (tag == "O" or tag.startswith("B-") or tag[2:] != current[0]):
            out.append((current[0], current[1], i))
            current = None
        if tag != "O" and current is None:
            current = (tag[2:], i)
    return out


def entities(tokens: list[str], tags: list[str], scores: list[float] | None = None) -> list[dict]:
    """A sentence's entities: type, surface form (its words joined, lower-cased) and mean word score."""
    return [{"type": kind, "text": " ".join(tokens[a:b]).lower(),
             "score": float(sum(scores[a:b]) / (b - a)) if scores is not None else None}
            for kind, a, b in spans(list(tags))]


def entity_counts(sentences: list[Sentence]) -> dict[str, int]:
    return dict(sorted(Counter(t for s in sentences for t, _, _ in spans(s.tags)).items()))


def align(word_ids: list[int | None], word_labels: list[int], label_all: bool, tags: list[str]) -> list[int]:
    """Label per sub-token: the word's label on its first sub-token; IGNORE (or, with label_all, the
    word's label with B- turned into I-) on the rest; IGNORE on special tokens."""
    to_inside = _inside(tuple(tags))
    out, previous = [], None
    for w in word_ids:
        if w is None:
            out.append(IGNORE)
        elif w != previous:
            out.append(word_labels[w])
        else:
            out.append(to_inside[word_labels[w]] if label_all else IGNORE)
        previous = w
    return out


@functools.lru_cache(maxsize=8)
def _inside(tags: tuple[str, ...]) -> dict[int, int]:
    """Per tag id, the id of its I- form (B-X -> I-X; any other tag: itself)."""
    return {i: tags.index("I-" + t[2:]) if t.startswith("B-") and "I-" + t[2:] in tags else i
            for i, t in enumerate(tags)}


def windows(subtokens_per_word: list[int], budget: int) -> list[tuple[int, int]]:
    """Cut a sentence into consecutive word ranges of at most `budget` sub-tokens each (a single longer
    word gets a window of its own and is truncated by the tokenizer)."""
    out, start, used = [], 0, 0
    for i, n in enumerate(subtokens_per_word):
        if used and used + n > budget:
            out.append((start, i))
            start, used = i, 0
        used += n
    out.append((start, len(subtokens_per_word)))
    return out


def memorization_baseline(train: list[Sentence], tokens: list[list[str]]) -> list[list[str]]:
    """Tag each word with its most frequent training tag (case-insensitive); unseen words get O."""
    seen: dict[str, Counter] = {}
    for s in train:
        for tok, tag in zip(s.tokens, s.tags):
            seen.setdefault(tok.lower(), Counter())[tag] += 1
    pred = [[seen[t.lower()].most_common(1)[0][0] if t.lower() in seen else "O" for t in sent] for sent in tokens]
    return [repaired(p) for p in pred]


def repaired(tags: list[str]) -> list[str]:
    """Predicted tags made valid IOB2 (a stray I-X becomes B-X)."""
    s = Sentence(["?"] * len(tags), list(tags), 0)
    check_tags(s, "prediction", repair=True, allowed=None)
    return s.tags


def char_spans(text: str, word_offsets: list[tuple[int, int]], tags: list[str], scores: list[float]) -> list[dict]:
    """Entities of a raw text: type, surface text, character start/end and the mean word score."""
    out = []
    for kind, a, b in spans(tags):
        start, end = word_offsets[a][0], word_offsets[b - 1][1]
        out.append({"type": kind, "text": text[start:end], "start": start, "end": end,
                    "score": round(float(sum(scores[a:b]) / (b - a)), 4)})
    return out
