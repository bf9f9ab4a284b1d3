"""The steps with task: token-classification, on small tagged data and the tiny model."""

import dataclasses

import pandas as pd
import pytest

from kftune.steps.ingest import ingest
from kftune.tables import DataError
from kftune.steps.tokenize import tokenize
from tests.conftest import ner_sentences, with_changes, write_conll


@pytest.fixture
def ner_params(params):
    return dataclasses.replace(params, task="token-classification")


def test_ingest_conll_and_jsonl_with_repairs_and_a_data_card(tmp_path, ner_params):
    (tmp_path / "in").mkdir()
    write_conll(tmp_path / "in" / "a.conll", ner_sentences(300))
    broken = [(["gainabc", "said"], ["I-per", "O"])]  # a stray I- tag: repaired to B-per
    (tmp_path / "in" / "b.jsonl").write_text(pd.DataFrame({"tokens": [t for t, _ in broken],
                                                           "tags": [g for _, g in broken]}).to_json(
        orient="records", lines=True))
    card = ingest(str(tmp_path / "in"), tmp_path / "out", ner_params.ingest, task=ner_params.task)
    assert card["labels"] == ["O", "B-org", "I-org", "B-per", "I-per"]
    assert sum(card["rows"].values()) == 301 and card["bio_repairs"] == 1
    assert set(card["entities"]["train"]) == {"org", "per"}
    test = pd.read_parquet(tmp_path / "out" / "test.parquet")
    assert list(test.columns) == ["text", "tokens", "tags"] and all(len(a) == len(b) for a, b in
                                                                     zip(test["tokens"], test["tags"]))


@pytest.mark.parametrize("content, message", [
    ("gainabc\tB-per\nsaid\tO\textra\n", r"bad.conll:2: expected 2 columns"),
    ("gainabc\tB-xyz\n", r"bad.conll:1: unknown tag 'B-xyz'"),
    ("-DOCSTART-\tO\n\n\n", r"bad.conll: no sentences"),
])
def test_bad_ner_input_names_file_and_line(tmp_path, ner_params, content, message):
    (tmp_path / "bad.conll").write_text(content)
    cfg = with_changes(ner_params.ingest, labels=["O", "B-per", "I-per"])
    with pytest.raises(DataError, match=message):
        ingest(str(tmp_path / "bad.conll"), tmp_path / "out", cfg, task=ner_params.task)


def test_long_sentences_become_windows_of_whole_words(tmp_path, ner_params):
    path = write_conll(tmp_path / "ner.conll", ner_sentences(300))
    ingest(str(path), tmp_path / "data", ner_params.ingest, task=ner_params.task)
    short = with_changes(ner_params.tokenize, max_length=12)
    stats = tokenize(tmp_path / "data", tmp_path / "short", ner_params.model.name, short)["splits"]["train"]
    windows = pd.read_parquet(tmp_path / "short" / "train.parquet")
    assert stats["windowed_sentences"] > 0 and stats["windows"] == len(windows) > stats["rows"]
    assert windows["input_ids"].map(len).max() <= 12, "no window is cut inside the model's limit"
    sentences = pd.read_parquet(tmp_path / "data" / "train.parquet")
    for _, sentence in windows.groupby("sentence"):  # the windows of a sentence cover each word once, in order
        words = [w + first for ids, first in zip(sentence["word_ids"], sentence["first_word"]) for w in
                 dict.fromkeys(i for i in ids if i >= 0)]
        assert words == list(range(len(sentences["tokens"][sentence["sentence"].iloc[0]])))


def test_a_sentence_the_tokenizer_makes_nothing_of_is_no_window(tmp_path, ner_params):
    """Only zero-width spaces: no sub-token, so no label to learn; a batch of such windows had a NaN loss."""
    sentences = ner_sentences(100) + [(["\u200b", "\u200b"], ["O", "O"])] * 3
    write_conll(tmp_path / "ner.conll", sentences)
    ingest(str(tmp_path / "ner.conll"), tmp_path / "data", ner_params.ingest, task=ner_params.task)
    stats = tokenize(tmp_path / "data", tmp_path / "tok", ner_params.model.name, ner_params.tokenize)["splits"]
    assert sum(s["windows_without_tokens"] for s in stats.values()) == 1, "one after dropping duplicates"
    for split in ("train", "validation", "test"):
        windows = pd.read_parquet(tmp_path / "tok" / f"{split}.parquet")
        assert all((labels != -100).any() for labels in windows["labels"])


def test_batched_windows_are_what_each_window_tokenized_alone_gives(tiny_model):
    from transformers import AutoTokenizer

    from kftune.steps.tokenize import word_windows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    sentences = [tokens for tokens, _ in ner_sentences(40)] + [[], ["\u200b", "gainabc", "\u200b"], ["x" * 60]]
    windows = word_windows(tok, sentences, 12)
    assert [w.sentence for w in windows] == sorted(w.sentence for w in windows) and any(w.first for w in windows)
    assert {w.sentence for w in windows} == set(range(len(sentences))), "every sentence, the empty one too"
    for w in windows:
        alone = tok(sentences[w.sentence][w.first:w.end], is_split_into_words=True, truncation=True, max_length=12)
        assert (w.input_ids, w.word_ids) == (alone["input_ids"], alone.word_ids())
        assert len(w.input_ids) <= 12
