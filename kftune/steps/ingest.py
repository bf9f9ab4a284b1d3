"""ingest: read labelled texts (or tagged sentences), clean them, split by a stable hash, write a data card."""

from __future__ import annotations

import logging
from pathlib import Path

from kftune.config import IngestConfig
from kftune.tables import (SPLITS, DataError, clean, content_sha256, describe, load_rows, quantiles, read_sentences,
                           require_splits, split_of, split_settings, write_dataset)

log = logging.getLogger(__name__)


def _ingest_tokens(source: str, out_dir: str | Path, cfg: IngestConfig, lineage: dict | None) -> dict:
    from kftune import ner

    raw, info = read_sentences(source, cfg)
    df, drops = clean(raw)  # on the joined text (the split and duplicate key); tokens and tags stay as read
    if df.empty:
        raise DataError(f"{source}: no usable sentences ({len(raw)} read; dropped {drops})")
    df["split"] = [split_of(t, cfg.split_salt, cfg.validation_fraction, cfg.test_fraction) for t in df["text"]]
    require_splits(df, source)
    tags = list(cfg.labels) or ner.tag_set([t for ts in df["tags"] for t in ts])
    per_split = {s: [ner.Sentence(list(k), list(t), 0) for k, t in zip(part["tokens"], part["tags"])]
                 for s, part in df.groupby("split")}
    card = {**info, "task": "token-classification", "rows_read": len(raw), "dropped": drops, "labels": tags,
            "split_salt": cfg.split_salt, "split": split_settings(cfg),
            "rows": {s: int((df["split"] == s).sum()) for s in SPLITS},
            "tokens": {s: int(df[df["split"] == s]["tokens"].map(len).sum()) for s in SPLITS},
            "entities": {s: ner.entity_counts(per_split.get(s, [])) for s in SPLITS},
            "sentence_length_words": quantiles(df["tokens"].map(len)), "sha256": content_sha256(df),
            "lineage": lineage or {"data_path": str(source)}}
    write_dataset(out_dir, df, card, columns=("text", "tokens", "tags"))
    log.info("ingest: %d sentences -> %s; %d BIO repairs; dropped %s", len(raw), card["rows"], info["bio_repairs"],
             drops)
    return card


def ingest(source: str, out_dir: str | Path, cfg: IngestConfig, lineage: dict | None = None,
           task: str = "sequence-classification", split_files: dict[str, str] | None = None) -> dict:
    """Read, clean, validate and split labelled texts (or, for token classification, tagged sentences).

    Args:
        source: a CSV/TSV/JSONL/Parquet file, a folder of them, or s3://bucket/prefix; for
            token classification a CoNLL or JSONL file, or a folder of them.
        out_dir: folder to write train/validation/test.parquet and data_card.json into.
        cfg: the `ingest` section of params.yaml.
        lineage: where the data came from (repo, revision, commit, DVC md5), kept in the data card.
        task: params.task.
        split_files: given splits instead of `source` and the hash split: split name -> file (train
            needed; a split not given is hashed out of train). A `split` column in `source` is honoured too.

    Returns:
        The data card.
    """
    if task == "token-classification":
        if split_files:
            from kftune.tables import DataError

            raise DataError("given split files are read for texts only so far; for tagged sentences put them in "
                            "one file and let the hash split them")
        return _ingest_tokens(source, out_dir, cfg, lineage)
    df, info = load_rows(source, cfg, split_files)
    source = source or ", ".join(split_files.values())
    require_splits(df, source)
    card = {**info, **describe(df), "task": task, "lineage": lineage or {"data_path": str(source)}}
    write_dataset(out_dir, df, card)
    log.info("ingest: %s rows -> %s; dropped %s", info["rows_read"], card["rows"], info["dropped"])
    return card
