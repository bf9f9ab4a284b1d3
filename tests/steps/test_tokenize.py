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


def test_truncation_is_applied_and_counted(prepared, params):
    stats = tokenize(prepared / "data", prepared / "short", params.model.name, with_changes(params.tokenize, max_length=8))
    assert pd.read_parquet(prepared / "short" / "train.parquet")["input_ids"].map(len).max() == 8
    full = pd.read_parquet(prepared / "tokenized" / "train.parquet")["input_ids"].map(len)
    s = stats["splits"]["train"]
    assert s["truncated"] == (full > 8).sum() > 0
    assert s["truncation_rate"] == s["truncated"] / len(full) and s["tokens_max"] == full.max()
