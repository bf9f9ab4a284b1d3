"""Length-grouped and packed batches: the cut and packing rules as pure functions, the pass cost timed on a real
tiny model, and the same predictions however the texts share forward passes."""

import numpy as np
import pytest

from kftune.predict import (length_groups, pack_rows, packed_logits, packing_unsupported, pass_tokens,
                            predict_logits)


def cost(lengths, groups, per_pass):
    return sum(per_pass + len(g) * max(lengths[i] for i in g) for g in groups)


def covers(groups, n, batch_size):
    flat = np.concatenate(groups)
    return sorted(flat.tolist()) == list(range(n)) and all(1 <= len(g) <= batch_size for g in groups)


def test_without_a_pass_cost_batches_are_runs_of_batch_size_in_length_order():
    lengths = [5, 40, 7, 12, 30, 8, 9]
    groups = length_groups(lengths, 3)
    assert [g.tolist() for g in groups] == [[0, 2, 5], [6, 3, 4], [1]]


@pytest.mark.parametrize("per_pass", [0, 10, 75, 300, 1e9])
def test_the_cuts_are_never_dearer_than_fixed_runs_and_no_dearer_than_any_split(per_pass):
    rng = np.random.default_rng(per_pass == 0)
    for _ in range(50):
        lengths = rng.integers(3, 80, rng.integers(1, 40)).tolist()
        groups = length_groups(lengths, 16, per_pass)
        assert covers(groups, len(lengths), 16)
        assert cost(lengths, groups, per_pass) <= cost(lengths, length_groups(lengths, 16), per_pass)
        # brute force over the cuts of the sorted lengths (at most 2^(n-1) splits; only small n)
        if len(lengths) <= 10:
            s = sorted(lengths)
            best = min(sum(per_pass + (b - a) * s[b - 1] for a, b in zip([0, *cuts], [*cuts, len(s)]))
                       for mask in range(2 ** (len(s) - 1))
                       for cuts in [[i + 1 for i in range(len(s) - 1) if mask >> i & 1]]
                       if all(b - a <= 16 for a, b in zip([0, *cuts], [*cuts, len(s)])))
            assert cost(lengths, groups, per_pass) == pytest.approx(best)


def test_a_free_pass_pads_nothing_and_a_dear_one_fills_batches():
    lengths = [4, 4, 9, 9, 9, 30]
    assert [sorted(lengths[i] for i in g) for g in length_groups(lengths, 8, 0)] == [[4, 4], [9, 9, 9], [30]]
    assert len(length_groups(lengths * 3, 8, 1e9)) == 3  # the fewest passes; padding only breaks ties


def test_a_cut_by_pass_cost_does_not_change_a_prediction(tiny_model):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    per_pass = pass_tokens(model, 16)  # timed on this model: None where a pass costs nothing measurable
    rng = np.random.default_rng(1)
    seqs = [[2, *rng.integers(5, 60, n).tolist(), 3] for n in rng.integers(1, 60, 40)]
    fixed = predict_logits(model, seqs, 0, 16)
    for cut in (0, 50, per_pass):
        np.testing.assert_allclose(predict_logits(model, seqs, 0, 16, pass_tokens=cut), fixed, atol=1e-5)


def test_packed_rows_hold_every_text_once_within_the_width_or_the_longest_text():
    rng = np.random.default_rng(2)
    for _ in range(50):
        lengths = rng.integers(1, 200, rng.integers(1, 60)).tolist()
        rows = pack_rows(lengths, 128)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        width = max(128, *lengths)
        assert all(sum(lengths[i] for i in row) <= width for row in rows)
        # first fit: no two rows could have been one (so no row is needlessly short)
        sums = sorted(sum(lengths[i] for i in row) for row in rows)
        assert len(sums) < 2 or sums[0] + sums[1] > width
    assert pack_rows([5, 60, 70, 30], 100) == [[2, 3], [1, 0]]


def test_packed_texts_get_the_padded_batches_logits(tiny_model):
    """Many texts per row, positions restarting, attention kept within each text: the same numbers as one
    text per padded row, in input order, whatever the pass size."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    assert packing_unsupported(model) is None
    rng = np.random.default_rng(3)
    seqs = [[2, *rng.integers(5, 60, n).tolist(), 3] for n in rng.integers(1, 100, 70)]
    padded = predict_logits(model, seqs, 0, 16)
    for batch_size, width in ((16, 128), (1, 32), (64, 128)):
        np.testing.assert_allclose(packed_logits(model, seqs, batch_size, width), padded, atol=1e-5)
    model.config.model_type = "distilbert"
    assert "not one of" in packing_unsupported(model)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_served_model_packs_only_where_packing_is_supported_and_answers_the_same(tiny_model, attention):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kftune.predict import choose_batching
    from kftune.serving.model import ServedModel

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2,
                                                               attn_implementation=attention).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    served = ServedModel("m", "1", "sequence-classification", ["a", "b"], model, tokenizer)
    texts = [" ".join(["gainoku", "lossira", "said"] * n) for n in range(1, 30)]
    padded = served.predict(texts, 8)
    seqs = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    served.batching = choose_batching(model, seqs, tokenizer.pad_token_id, 8)
    assert served.batching.packed == (attention == "sdpa"), served.batching
    assert ("packed rows" if attention == "sdpa" else "'eager', not 'sdpa'") in served.batching.reason
    for got, want in zip(served.predict(texts, 8), padded):
        assert got["label"] == want["label"] and got["probability"] == pytest.approx(want["probability"], abs=1e-5)


def test_a_word_the_tokenizer_drops_does_not_cut_an_entity(tiny_model):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from kftune.predict import predict_spans

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForTokenClassification.from_pretrained(
        tiny_model, num_labels=3, id2label={0: "O", 1: "B-PER", 2: "I-PER"}, label2id={"O": 0, "B-PER": 1, "I-PER": 2})
    with torch.no_grad():  # every token I-PER: each text is one entity from its first word to its last
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    texts = ["gain \u0301 loss", "gain \u200b loss", "\ufeffgain loss", "gain  loss"]
    got = [[(e["text"], e["start"], e["end"]) for e in spans] for spans in predict_spans(model.eval(), tok, texts)]
    assert got == [[("gain \u0301 loss", 0, 11)], [("gain \u200b loss", 0, 11)], [("gain loss", 1, 10)],
                   [("gain  loss", 0, 10)]]


def test_words_come_from_the_tokenizer_itself_so_cjk_ideographs_are_words_of_their_own(tiny_model):
    """BERT's normalizer puts each CJK ideograph on its own; its pre-tokenizer alone left "东京是首都" one word,
    and an entity tagged on its first character took all five."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from kftune.predict import predict_spans, text_words

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "东京是首都 in Tokyo, \u200bok"
    assert text_words(tok.backend_tokenizer, [text]) == [[("东", (0, 1)), ("京", (1, 2)), ("是", (2, 3)),
                                                          ("首", (3, 4)), ("都", (4, 5)), ("in", (6, 8)),
                                                          ("Tokyo", (9, 14)), (",", (14, 15)), ("ok", (17, 19))]]
    model = AutoModelForTokenClassification.from_pretrained(
        tiny_model, num_labels=3, id2label={0: "O", 1: "B-LOC", 2: "I-LOC"}, label2id={"O": 0, "B-LOC": 1, "I-LOC": 2})
    with torch.no_grad():  # every token B-LOC: each word is an entity of its own
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    [spans] = predict_spans(model.eval(), tok, ["东京是首都"])
    assert [(e["text"], e["start"], e["end"]) for e in spans] == [("东", 0, 1), ("京", 1, 2), ("是", 2, 3),
                                                                  ("首", 3, 4), ("都", 4, 5)]


def test_a_version_trained_on_masked_texts_sees_served_texts_masked_the_same_way(tiny_model, monkeypatch):
    """ingest.mask_pii: the model learned <EMAIL>, never an address; served raw, it would see what it never saw."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from kftune.predict import predict_spans
    from kftune.serving import model as served_model
    from kftune.serving.model import ServedModel

    tok = AutoTokenizer.from_pretrained(tiny_model)
    clf = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    text, masked = "refund  to jane.doe@example.com now", "refund to <EMAIL> now"
    plain, careful = (ServedModel("m", "1", "sequence-classification", ["a", "b"], clf, tok, mask_pii=m)
                      for m in (False, True))
    assert careful.predict([text], 8) == plain.predict([masked], 8) != plain.predict([text], 8)

    import torch

    from kftune import predict

    tagger = AutoModelForTokenClassification.from_pretrained(
        tiny_model, num_labels=3, id2label={0: "O", 1: "B-PER", 2: "I-PER"}, label2id={"O": 0, "B-PER": 1, "I-PER": 2})
    with torch.no_grad():  # every token B-PER: each word an entity of its own
        tagger.classifier.weight.zero_()
        tagger.classifier.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    real, seen = predict._word_tags, []
    monkeypatch.setattr(predict, "_word_tags", lambda m, t, words, *a: seen.append(words) or real(m, t, words, *a))
    [spans] = predict_spans(tagger.eval(), tok, [text], 8, mask_pii=True)
    assert seen[0][0][:3] == ["refund", "to", "<EMAIL>"] and "jane" not in seen[0][0], "the model sees it masked"
    assert [e["text"] for e in spans][:3] == ["refund", "to", "jane"], "the spans point into the text as given"
    assert all(text[e["start"]:e["end"]] == e["text"] for e in spans)

    rows = pd.DataFrame({"text": ["a b", "c"], "label": ["x", "y"], "split": ["test", "train"]})
    monkeypatch.setattr("kftune.steps.resolve.download_reference",
                        lambda name, version, dest: (rows, {"split": {"mask_pii": True, "split_salt": "s"}}))
    assert served_model.version_reference("m", "1", 10, 10) == (["a b"], ["c"], True)
