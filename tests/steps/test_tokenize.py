import re

import pandas as pd

from kftune.fileio import read_json
from kftune.steps.tokenize import tokenize
from tests.conftest import with_changes


def test_no_padding_is_stored_and_labels_are_ids(prepared):
    train = pd.read_parquet(prepared / "tokenized" / "train.parquet")
    lengths = train["input_ids"].map(len)
    assert lengths.nunique() > 3, "sequences must keep their own lengths (padding happens per batch)"
    assert set(train["label"]) == {0, 1}
    stats = read_json(prepared / "tokenized" / "tokenize_stats.json")
    assert stats["labels"] == ["negative", "positive"]
    assert stats["splits"]["train"]["truncation_rate"] == 0
    assert (prepared / "tokenized" / "tokenizer" / "tokenizer.json").is_file()


def test_truncation_is_applied_and_counted_and_progress_is_reported(prepared, params, caplog):
    caplog.set_level("INFO", logger="kftune.progress")
    stats = tokenize(prepared / "data", prepared / "short", params.model.name, with_changes(params.tokenize, max_length=8))
    rows = sum(split["rows"] for split in stats["splits"].values())
    assert any(re.fullmatch(rf"tokenize: {rows}/{rows} texts, \d+:\d\d elapsed, ETA 0:00", m) for m in caplog.messages)
    assert pd.read_parquet(prepared / "short" / "train.parquet")["input_ids"].map(len).max() == 8
    full = pd.read_parquet(prepared / "tokenized" / "train.parquet")["input_ids"].map(len)
    s = stats["splits"]["train"]
    assert s["truncated"] == (full > 8).sum() > 0
    assert s["truncation_rate"] == s["truncated"] / len(full) and s["tokens_max"] == full.max()


def test_one_tokenizer_pass_gives_the_ids_and_lengths_of_two(params):
    from kftune.steps.tokenize import load_tokenizer, truncate

    tok = load_tokenizer(params.model.name)
    texts = ["the group said gainoku today", "", "word " * 100, "Hé, l'unité — 3.5%!"]
    ids, full = truncate(tok, texts, 16)
    assert ids == tok(texts, truncation=True, max_length=16)["input_ids"]
    assert list(full) == [len(x) for x in tok(texts, truncation=False, verbose=False)["input_ids"]]
    assert max(len(x) for x in ids) == 16 and full[2] > 100
