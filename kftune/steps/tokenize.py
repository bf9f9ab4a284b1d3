"""tokenize: batched fast tokenization, truncated to max_length and left unpadded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from kftune.config import TokenizeConfig
from kftune.fileio import atomic_dir, read_json, write_json
from kftune.progress import Progress
from kftune.tables import SPLITS

log = logging.getLogger(__name__)


def load_tokenizer(model_name: str):
    from transformers import AutoTokenizer

    from kftune.base_models import load_pretrained, resolve_base_model

    tok = load_pretrained(AutoTokenizer, resolve_base_model(model_name))
    if not tok.is_fast:
        raise ValueError(f"model.name={model_name!r}: kftune needs a fast (Rust) tokenizer")
    return tok


class Window(NamedTuple):
    sentence: int  # index in the sentences given
    first: int  # words [first, end) of that sentence
    end: int
    input_ids: list[int]
    word_ids: list  # per token, its word's index within the window; None for special tokens


def word_windows(tok, sentences: list[list[str]], max_length: int) -> list[Window]:
    """Every sentence cut into windows of whole words whose sub-tokens (plus [CLS] and [SEP]) fit in max_length
    (a single longer word gets a window of its own and is truncated), in order, from two batched calls of the
    tokenizer."""
    from kftune.ner import windows

    if not sentences:
        return []
    counted = tok(sentences, is_split_into_words=True, add_special_tokens=False)
    budget = max_length - tok.num_special_tokens_to_add()
    spans = []
    for n, words in enumerate(sentences):
        per_word = [0] * len(words)
        for w in counted.word_ids(n):
            per_word[w] += 1
        spans += [(n, a, b) for a, b in windows([max(c, 1) for c in per_word], budget)]
    enc = tok([sentences[n][a:b] for n, a, b in spans], is_split_into_words=True, truncation=True,
              max_length=max_length)
    return [Window(n, a, b, ids, enc.word_ids(k)) for k, ((n, a, b), ids) in enumerate(zip(spans, enc["input_ids"]))]


def truncate(tok, texts: list[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids truncated to max_length (special tokens included) and every text's untruncated length,
    from one pass of the tokenizer (the Rust backend: encode once, then truncate and add specials)."""
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    specials = tok.num_special_tokens_to_add()
    full = np.array([len(e.ids) for e in encodings], dtype=int) + specials
    ids = []
    for e in encodings:
        e.truncate(max_length - specials)
        ids.append(backend.post_processor.process(e).ids if backend.post_processor else e.ids)
    return ids, full


def tokenize_words(tok, sentences: list[list[str]], tag_ids: list[list[int]], labels: list[str],
                   cfg: TokenizeConfig, progress: Progress | None = None) -> tuple[pd.DataFrame, dict]:
    """Token classification: windows of whole words, sub-token labels aligned with word_ids().

    Returns one row per window (input_ids, labels, word_ids with -1 for special tokens, sentence,
    first_word) and statistics.
    """
    from kftune.ner import IGNORE, align

    rows, chunk, empty = [], 2048, 0  # sentences per batched tokenizer call, for progress
    for first in range(0, len(sentences), chunk):
        for w in word_windows(tok, sentences[first:first + chunk], cfg.max_length):
            n = first + w.sentence
            aligned = align(w.word_ids, tag_ids[n][w.first:w.end], cfg.label_all_subtokens, labels)
            if all(a == IGNORE for a in aligned):  # words the tokenizer drops (zero-width spaces): nothing to
                empty += 1  # learn or score, and a batch of only such windows has a NaN loss
                continue
            rows.append({"input_ids": w.input_ids, "labels": aligned,
                         "word_ids": [-1 if i is None else i for i in w.word_ids],
                         "sentence": n, "first_word": w.first})
        if progress:
            progress.update(min(chunk, len(sentences) - first))
    windowed = len({r["sentence"] for r in rows if r["first_word"] > 0})
    lengths = np.array([len(r["input_ids"]) for r in rows] or [0])
    return pd.DataFrame(rows, columns=["input_ids", "labels", "word_ids", "sentence", "first_word"]), {
        "rows": len(sentences), "windows": len(rows), "windows_without_tokens": empty, "windowed_sentences": windowed,
        "truncation_rate": windowed / max(len(sentences), 1), "tokens_p50": float(np.percentile(lengths, 50)),
        "tokens_p95": float(np.percentile(lengths, 95)), "tokens_max": int(lengths.max())}


def tokenize(data_dir: str | Path, out_dir: str | Path, model_name: str, cfg: TokenizeConfig) -> dict:
    """Tokenize every split with the base model's tokenizer; padding happens later, per batch.

    Args:
        data_dir: ingest output (train/validation/test.parquet and data_card.json).
        out_dir: folder for {split}.parquet (input_ids, label), the tokenizer and tokenize_stats.json.
        model_name: base model whose tokenizer to use (see kftune.base_models).
        cfg: the `tokenize` section of params.yaml.

    Returns:
        Token-length and truncation statistics per split.
    """
    data_dir = Path(data_dir)
    card = read_json(data_dir / "data_card.json")
    labels, task = card["labels"], card.get("task", "sequence-classification")
    label_id = {lbl: i for i, lbl in enumerate(labels)}
    tok = load_tokenizer(model_name)
    stats = {"model": model_name, "max_length": cfg.max_length, "labels": labels, "task": task, "splits": {}}
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(data_dir / f"{split}.parquet").num_rows for split in SPLITS)  # the footers only
    ner = task == "token-classification"
    progress = Progress("tokenize", rows, "sentences" if ner else "texts")
    if ner:
        with atomic_dir(out_dir) as tmp:
            for split in SPLITS:
                df = pd.read_parquet(data_dir / f"{split}.parquet")
                windows, split_stats = tokenize_words(tok, [list(t) for t in df["tokens"]],
                                                      [[label_id[x] for x in t] for t in df["tags"]], labels, cfg,
                                                      progress)
                windows.to_parquet(tmp / f"{split}.parquet", index=False)
                stats["splits"][split] = split_stats
            tok.save_pretrained(tmp / "tokenizer")
            write_json(tmp / "tokenize_stats.json", stats)
        log.info("tokenize: %s", {s: v["windowed_sentences"] for s, v in stats["splits"].items()})
        return stats
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            df = pd.read_parquet(data_dir / f"{split}.parquet")
            texts = df["text"].tolist()
            ids, full = truncate(tok, texts, cfg.max_length)
            progress.update(len(texts))
            pd.DataFrame({"input_ids": ids, "label": df["label"].map(label_id).astype("int64")}).to_parquet(
                tmp / f"{split}.parquet", index=False)
            truncated = int((full > cfg.max_length).sum())
            stats["splits"][split] = {
                "rows": len(df),
                "truncated": truncated,
                "truncation_rate": truncated / max(len(df), 1),
                "tokens_p50": float(np.percentile(full, 50)),
                "tokens_p95": float(np.percentile(full, 95)),
                "tokens_max": int(full.max()),
            }
        tok.save_pretrained(tmp / "tokenizer")
        write_json(tmp / "tokenize_stats.json", stats)
    log.info("tokenize: %s", {s: v["truncation_rate"] for s, v in stats["splits"].items()})
    return stats
