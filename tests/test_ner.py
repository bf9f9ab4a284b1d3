"""NER helpers on hand-made examples whose answer is known."""

import json

import pytest

from kftune import ner
from kftune.metrics import entity_metrics
from kftune.ner import IGNORE, NerDataError, Sentence


def test_read_conll_skips_docstart_and_reads_the_configured_column(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- O O\n\nAnn NNP B-PER\nLee NNP I-PER\nsang VBD O\n\n\nParis NNP B-LOC\n")
    sentences = ner.read_conll(path, tag_column=-1)
    assert [(s.tokens, s.tags, s.line) for s in sentences] == [
        (["Ann", "Lee", "sang"], ["B-PER", "I-PER", "O"], 3), (["Paris"], ["B-LOC"], 8)]
    assert ner.read_conll(path, tag_column=1)[0].tags == ["NNP", "NNP", "VBD"]


def test_a_byte_order_mark_is_not_a_token_and_pii_masking_keeps_tags_aligned(tmp_path):
    from kftune.config import load_params
    from kftune.tables import read_sentences
    from tests.conftest import ROOT

    path = tmp_path / "bom.conll"  # Excel and Notepad start UTF-8 files with a BOM
    path.write_bytes("\ufeff-DOCSTART- O\n\nmail O\njohn.doe@example.com O\nor O\nAnn B-PER\n".encode())
    assert [s.tokens for s in ner.read_conll(path, -1)] == [["mail", "john.doe@example.com", "or", "Ann"]]
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"tokens": ["Ann"], "tags": ["B-PER"]}\n'.encode())
    assert ner.read_jsonl(tmp_path / "bom.jsonl")[0].tokens == ["Ann"]
    cfg = load_params(ROOT / "params.yaml", ["ingest.mask_pii=true"]).ingest
    df, _ = read_sentences(str(path), cfg)
    assert list(df["tokens"][0]) == ["mail", "<EMAIL>", "or", "Ann"] and list(df["tags"][0])[3] == "B-PER"
    assert df["text"][0] == "mail <EMAIL> or Ann"


def test_a_malformed_conll_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("Ann\tB-PER\nLee\tI-PER\textra\n")
    with pytest.raises(NerDataError, match=r"bad.conll:2: expected 2 columns .* got 3"):
        ner.read_conll(path, -1)


def test_read_jsonl_checks_lengths(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"tokens": ["Ann", "sang"], "tags": ["B-PER", "O"]}\n{"tokens": ["x"], "tags": []}\n')
    with pytest.raises(NerDataError, match=r"a.jsonl:2: 1 tokens but 0 tags"):
        ner.read_jsonl(path)
    path.write_text('{"tokens": [], "tags": []}\n{"tokens": ["Ann"], "tags": ["B-PER"]}\n')  # empty: skipped
    assert [s.line for s in ner.read_jsonl(path)] == [2]
    path.write_text('{"tokens": 5, "tags": 5}\n')
    with pytest.raises(NerDataError, match=r"a.jsonl:1: expected a JSON object with 'tokens' and 'tags' lists"):
        ner.read_jsonl(path)


def test_bio_repair_and_rejection():
    s = Sentence(["a", "b", "c", "d"], ["I-PER", "I-PER", "B-LOC", "I-PER"], 1)
    assert ner.check_tags(s, "f:1", repair=True, allowed=None) == 2
    assert s.tags == ["B-PER", "I-PER", "B-LOC", "B-PER"]
    with pytest.raises(NerDataError, match=r"f:1: 'I-PER' on token 'a' follows 'O'.*bio_repair"):
        ner.check_tags(Sentence(["a"], ["I-PER"], 1), "f:1", repair=False, allowed=None)
    with pytest.raises(NerDataError, match="unknown tag 'B-ORG'"):
        ner.check_tags(Sentence(["a"], ["B-ORG"], 1), "f:1", True, allowed={"O", "B-PER", "I-PER"})
    with pytest.raises(NerDataError, match="tag 'PER' of token 'a' is not O, B-TYPE or I-TYPE"):
        ner.check_tags(Sentence(["a"], ["PER"], 1), "f:1", True, allowed=None)
    # IOB1-style data and ingest.labels without the B- tag: the repair's B-PER would be a tag tokenize cannot map
    with pytest.raises(NerDataError, match=r"f:1: I-PER on token 'a' repaired to 'B-PER', which ingest.labels does "
                                           r"not list \(\['I-PER', 'O'\]\): add it"):
        ner.check_tags(Sentence(["a", "b"], ["I-PER", "I-PER"], 1), "f:1", True, allowed={"O", "I-PER"})


def test_tag_set_and_spans():
    assert ner.tag_set(["O", "B-PER", "B-LOC", "I-LOC"]) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert ner.spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-PER"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("PER", 6, 7)]


def test_align_labels_first_subtoken_or_all():
    tags = ["O", "B-PER", "I-PER"]
    word_ids = [None, 0, 0, 0, 1, None]  # "Annabel" -> 3 sub-tokens, "sang" -> 1
    assert ner.align(word_ids, [1, 0], label_all=False, tags=tags) == [IGNORE, 1, IGNORE, IGNORE, 0, IGNORE]
    assert ner.align(word_ids, [1, 0], label_all=True, tags=tags) == [IGNORE, 1, 2, 2, 0, IGNORE]
    assert ner.align(word_ids, [1, 0], label_all=True, tags=["O", "B-PER"]) == [IGNORE, 1, 1, 1, 0, IGNORE], \
        "a tag set without I-PER keeps B-PER"


def test_windows_keep_words_whole():
    assert ner.windows([3, 2, 4, 1], budget=5) == [(0, 2), (2, 4)]
    assert ner.windows([2, 7, 1], budget=5) == [(0, 1), (1, 2), (2, 3)], "an over-long word gets its own window"
    assert ner.windows([1, 1], budget=5) == [(0, 2)]


def test_memorization_baseline_and_entity_metrics():
    train = [Sentence(["Ann", "sang", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"], 1),
             Sentence(["ann", "left"], ["B-PER", "O"], 2)]
    pred = ner.memorization_baseline(train, [["ann", "flew", "to", "Paris", "Lee"]])
    assert pred == [["B-PER", "O", "O", "B-LOC", "O"]]
    m = entity_metrics([["B-PER", "O", "O", "B-LOC", "B-PER"]], pred)
    assert (m["precision"], m["recall"]) == (1.0, pytest.approx(2 / 3))
    assert m["entity_f1"] == pytest.approx(0.8) and m["token_accuracy"] == pytest.approx(0.8)
    assert m["per_type"]["PER"]["recall"] == 0.5 and m["per_type"]["LOC"]["f1"] == 1.0


def test_char_spans_from_word_offsets():
    text = "Ann Lee flew to New York."
    offsets = [(0, 3), (4, 7), (8, 12), (13, 15), (16, 19), (20, 24), (24, 25)]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]
    assert ner.char_spans(text, offsets, tags, [0.9, 0.7, 1, 1, 0.8, 0.6, 1]) == [
        {"type": "PER", "text": "Ann Lee", "start": 0, "end": 7, "score": 0.8},
        {"type": "LOC", "text": "New York", "start": 16, "end": 24, "score": 0.7}]


def test_a_bad_tag_is_reported_at_its_own_line(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("Ann\tB-PER\n\nThe\tO\nboard\tO\nmet\tX-ORG\n")
    (s1, s2) = ner.read_conll(path, tag_column=-1)
    assert s2.line == 3 and s2.lines == (3, 4, 5)
    with pytest.raises(NerDataError, match=rf"{path}:5: tag 'X-ORG' of token 'met'"):
        ner.check_tags(s2, f"{path}:{s2.line}", repair=True, allowed=None)


def test_only_newlines_end_lines_in_conll_and_jsonl(tmp_path):
    """U+0085 (cp1252's "..." read as latin-1) and U+2028 (left unescaped by json.dumps(ensure_ascii=False)) are
    characters of a token, not line breaks."""
    (tmp_path / "a.conll").write_bytes(b"Wait\tO\r\n\x85\tO\r\nParis\tB-LOC\r\n")
    (sentence,) = ner.read_conll(tmp_path / "a.conll", -1, encoding="latin-1")
    assert sentence.tokens == ["Wait", "\x85", "Paris"] and sentence.tags == ["O", "O", "B-LOC"]
    row = json.dumps({"tokens": ["a\u2028b", "c"], "tags": ["O", "O"]}, ensure_ascii=False)
    assert "\u2028" in row
    (tmp_path / "a.jsonl").write_text(row + "\n", encoding="utf-8")
    (sentence,) = ner.read_jsonl(tmp_path / "a.jsonl")
    assert sentence.tokens == ["a\u2028b", "c"]
