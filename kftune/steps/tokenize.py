"""tokenize: batched fast tokenization, truncated to max_length and left unpadded."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from kftune.config import TokenizeConfig
from kftune.fileio import atomic_dir, read_json, write_json
from kftune.steps.ingest import SPLITS

log = logging.getLogger(__name__)


def load_tokenizer(model_name: str):
    from transformers import AutoTokenizer

    from kftune.models import load_pretrained, resolve_base_model

    tok = load_pretrained(AutoTokenizer, resolve_base_model(model_name))
    if not tok.is_fast:
        raise ValueError(f"model.name={model_name!r}: kftune needs a fast (Rust) tokenizer")
    return tok


def tokenize(data_dir: str | Path, out_dir: str | Path, model_name: str, cfg: TokenizeConfig) -> dict:
    """Tokenize every split with the base model's tokenizer; padding happens later, per batch.

    Args:
        data_dir: ingest output (train/validation/test.parquet and data_card.json).
        out_dir: folder for {split}.parquet (input_ids, label), the tokenizer and tokenize_stats.json.
        model_name: base model whose tokenizer to use (see kftune.models).
        cfg: the `tokenize` section of params.yaml.

    Returns:
        Token-length and truncation statistics per split.
    """
    data_dir = Path(data_dir)
    labels = read_json(data_dir / "data_card.json")["labels"]
    label_id = {lbl: i for i, lbl in enumerate(labels)}
    tok = load_tokenizer(model_name)
    stats = {"model": model_name, "max_length": cfg.max_length, "labels": labels, "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            df = pd.read_parquet(data_dir / f"{split}.parquet")
            texts = df["text"].tolist()
            full = np.array([len(ids) for ids in tok(texts, truncation=False, verbose=False)["input_ids"]])
            ids = tok(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
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
