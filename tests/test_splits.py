"""User-given splits: a `split` column or one file per split, honoured and recorded; the hash stays the default."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from kftune.cli import main
from kftune.steps.ingest import ingest
from kftune.tables import DataError, split_of

from .conftest import ner_sentences, subword_texts, write_conll


def _splits(folder) -> dict[str, set[str]]:
    return {s: set(pd.read_parquet(folder / f"{s}.parquet")["text"]) for s in ("train", "validation", "test")}


def test_a_split_column_round_trips_and_a_test_copy_wins_over_train(tmp_path, params):
    df = subword_texts(300, seed=1)
    df["split"] = ["test" if i % 5 == 0 else "dev" if i % 5 == 1 else "train" for i in range(len(df))]
    leak = df.iloc[[0]].assign(split="train")  # a test text repeated in train: kept in test only
    pd.concat([leak, df]).to_csv(tmp_path / "given.csv", index=False)

    card = ingest(str(tmp_path / "given.csv"), tmp_path / "data", params.ingest)
    got = _splits(tmp_path / "data")
    assert got["test"] == set(df[df["split"] == "test"]["text"])
    assert got["validation"] == set(df[df["split"] == "dev"]["text"])
    assert got["train"] == set(df[df["split"] == "train"]["text"])
    assert card["split_given"] == {"given_by": "column 'split'", "given": ["train", "validation", "test"],
                                   "hashed_from_train": []}
    assert card["dropped"]["duplicate"] == 1
    saved = json.loads((tmp_path / "data" / "data_card.json").read_text())
    assert saved["split_given"] == card["split_given"]


def test_a_later_batch_that_gives_test_rows_moves_no_earlier_row_and_a_conflict_keeps_the_test_copy(tmp_path,
                                                                                                     params):
    first = subword_texts(300, seed=4).assign(split="train")  # v1 gives train only: test is hashed out of it
    (tmp_path / "v").mkdir()
    first.to_csv(tmp_path / "v" / "batch-000.csv", index=False)
    ingest(str(tmp_path / "v"), tmp_path / "d1", params.ingest)
    before = _splits(tmp_path / "d1")
    later = subword_texts(60, seed=5).assign(split="test")
    clash = first.iloc[[0]].assign(label="negative" if first["label"].iloc[0] == "positive" else "positive",
                                   split="test")  # a golden test row whose text a train row labels otherwise
    pd.concat([later, clash]).to_csv(tmp_path / "v" / "batch-001.csv", index=False)
    card = ingest(str(tmp_path / "v"), tmp_path / "d2", params.ingest)
    after = _splits(tmp_path / "d2")
    assert before["test"] - {clash["text"].iloc[0]} <= after["test"], "v1's hashed test rows stay in test"
    assert clash["text"].iloc[0] in after["test"] and clash["text"].iloc[0] not in after["train"]
    test = pd.read_parquet(tmp_path / "d2" / "test.parquet").set_index("text")["label"]
    assert test[clash["text"].iloc[0]] == clash["label"].iloc[0] and card["dropped"]["conflicting_labels"] == 1
    assert card["split_given"]["given"] == ["train", "test"], card["split_given"]
    assert card["split_given"]["hashed_from_train"] == ["validation", "test"], "batch-000 gives no test: hashed"


def test_split_files_with_validation_hashed_out_of_train(tmp_path, params):
    train, test = subword_texts(400, seed=2), subword_texts(80, seed=3)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_json(tmp_path / "test.jsonl", orient="records", lines=True)
    assert main(["step", "ingest", "--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.jsonl"),
                 "--out", str(tmp_path / "data"), "--params", _params_file(tmp_path, params)]) == 0
    got = _splits(tmp_path / "data")
    cfg = params.ingest
    assert got["test"] == set(test["text"])
    hashed = {t for t in train["text"] if t not in got["test"] and
              split_of(t, cfg.split_salt, cfg.validation_fraction, cfg.test_fraction) == "validation"}
    assert got["validation"] == hashed and got["train"] == set(train["text"]) - hashed - got["test"]
    card = json.loads((tmp_path / "data" / "data_card.json").read_text())
    assert card["split_given"]["given_by"] == "files" and card["split_given"]["hashed_from_train"] == ["validation"]
    assert {s["split"] for s in card["sources"]} == {"train", "test"}


def test_tagged_split_files_are_honoured_and_a_sentence_in_test_leaves_train(tmp_path, params):
    train, dev, test = ner_sentences(300, seed=4), ner_sentences(40, seed=5), ner_sentences(60, seed=6)
    write_conll(tmp_path / "train.conll", [*train, test[0]])  # a test sentence repeated in train: kept in test
    write_conll(tmp_path / "dev.conll", dev)
    write_conll(tmp_path / "test.conll", test)
    params.task = "token-classification"
    assert main(["step", "ingest", "--train", str(tmp_path / "train.conll"), "--validation", str(tmp_path / "dev.conll"),
                 "--test", str(tmp_path / "test.conll"), "--out", str(tmp_path / "data"),
                 "--params", _params_file(tmp_path, params)]) == 0
    got = _splits(tmp_path / "data")
    words = lambda sentences: {" ".join(tokens) for tokens, _ in sentences}  # noqa: E731
    assert got == {"train": words(train) - words(test), "validation": words(dev), "test": words(test)}
    card = json.loads((tmp_path / "data" / "data_card.json").read_text())
    assert card["split_given"] == {"given_by": "files", "given": ["train", "validation", "test"],
                                   "hashed_from_train": []}
    assert card["dropped"]["duplicate"] == 1 and card["rows"]["test"] == len(words(test))
    assert {s["split"] for s in card["sources"]} == {"train", "validation", "test"}


def test_an_unknown_split_value_names_its_line(tmp_path, params):
    pd.DataFrame({"text": ["a b", "c d"], "label": ["x", "y"], "split": ["train", "holdout"]}).to_csv(
        tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv:3: split 'holdout' is not train, validation \(or dev\) or test"):
        ingest(str(tmp_path / "bad.csv"), tmp_path / "data", params.ingest)
    (tmp_path / "multi.csv").write_text('text,label,split\n"a quoted\ntext over\nthree lines",x,train\n\nc d,y,holdout\n')
    with pytest.raises(DataError, match=r"multi.csv:6: split 'holdout'"):
        ingest(str(tmp_path / "multi.csv"), tmp_path / "data", params.ingest)


def _params_file(tmp_path, params) -> str:
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return str(path)


def test_golden_labels_are_read_as_ingest_reads_them(tmp_path, params):
    """A golden file saved on macOS spells "négatif" decomposed (NFD); the training data's NFC spelling is the same
    label."""
    import unicodedata

    from kftune.splits import check_golden, read_golden

    golden = tmp_path / "golden.csv"
    golden.write_text("text,label\nbad news,%s\ngood news, positif\n" % unicodedata.normalize("NFD", "négatif"),
                      encoding="utf-8")
    rows = read_golden(str(golden), params.ingest, "sequence-classification")
    check_golden(rows, ["négatif", "positif"], str(golden))
    assert rows["label"].tolist() == ["négatif", "positif"]
