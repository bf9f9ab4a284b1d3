import re

import numpy as np
import pandas as pd
import pytest
from markdown_it import MarkdownIt

from kftune.fileio import read_json
from kftune.metrics import classification_metrics, expected_calibration_error
from kftune.steps.evaluate import evaluate
from kftune.steps.finetune import finetune


def test_ece_is_zero_when_confidence_matches_accuracy():
    # 10 predictions at confidence 0.8, 8 of them right
    probs = np.array([[0.8, 0.2]] * 10)
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(0.0)


def test_ece_of_an_overconfident_model():
    probs = np.array([[0.9, 0.1]] * 10)  # 90% sure, half right -> gap 0.4
    y = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(0.4)


def test_classification_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, np.eye(3)[pred], ["a", "b", "c"], ece_bins=10)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2,
                                  "predicted": 3}
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["macro_f1"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))


def test_evaluate_scores_model_and_baselines_on_the_test_split(prepared, params):
    finetune(prepared / "tokenized", prepared / "model", params.model.name, params.finetune)
    m = evaluate(prepared / "data", prepared / "model", prepared / "eval", params.evaluate)
    assert read_json(prepared / "eval" / "evaluation.json") == m
    assert {p.name for p in (prepared / "eval").iterdir()} == {
        "metrics.json", "evaluation.json", "report.md", "report.html", "confusion_matrix.json",
        "confusion_matrix.png", "predictions.csv"}
    assert read_json(prepared / "eval" / "metrics.json")["macro_f1"] == round(m["model"]["macro_f1"], 4)
    predictions = pd.read_csv(prepared / "eval" / "predictions.csv")
    assert len(predictions) == m["test_rows"]
    assert (predictions["label"] == predictions["predicted"]).mean() == pytest.approx(m["model"]["accuracy"])
    assert sum(map(sum, m["model"]["confusion_matrix"])) == m["test_rows"]
    # the sub-word data is built so that word counts fail and the encoder does not
    assert m["model"]["macro_f1"] > 0.9 > 0.7 > m["baselines"]["tfidf_logreg"]["macro_f1"]
    assert m["baselines"]["majority"]["macro_f1"] < 0.5
    report = (prepared / "eval" / "report.md").read_text()
    assert f"{m['model']['macro_f1']:.4f}" in report and "tfidf_logreg" in report


def test_hostile_data_is_escaped_in_the_report_and_neutralised_in_the_csv(tmp_path, params):
    from kftune.steps.finetune import finetune
    from kftune.steps.ingest import ingest
    from kftune.steps.tokenize import tokenize
    from tests.conftest import subword_texts, with_changes

    df = subword_texts(600)
    df["label"] = df["label"].map({"negative": "<img src=x onerror=alert(1)>", "positive": "pos|\x1b[31mred"})
    df.loc[df.index[:300], "text"] = "=HYPERLINK(\"http://evil\") " + df["text"][:300]
    df.to_csv(tmp_path / "hostile.csv", index=False)
    ingest(str(tmp_path / "hostile.csv"), tmp_path / "data", params.ingest)
    tokenize(tmp_path / "data", tmp_path / "tok", params.model.name, params.tokenize)
    finetune(tmp_path / "tok", tmp_path / "model", params.model.name, with_changes(params.finetune, max_steps=10))
    evaluate(tmp_path / "data", tmp_path / "model", tmp_path / "eval", params.evaluate)
    report = (tmp_path / "eval" / "report.md").read_text()
    rendered = MarkdownIt("commonmark").enable("table").render(report)  # as a Markdown viewer shows it
    assert "<img src=x" not in rendered and "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in rendered
    assert "\x1b" not in report and "<td>pos|red</td>" in rendered
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "<img src=x" not in page and "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in page and "<td>---" not in page
    csv = (tmp_path / "eval" / "predictions.csv").read_text()
    assert "\n=HYPERLINK" not in csv and "'=HYPERLINK" in csv


def test_markdown_cells_are_inert_whatever_the_label():
    from kftune.console import code_span, markdown_cell

    for label in ["[win](https://evil.example)", "**urgent**", "a`b, c`d", "caf\x85e <b>x</b>", "a\u2028b", "R&D"]:
        cell = MarkdownIt("commonmark").enable("table").render(f"| x |\n|---|\n| {markdown_cell(label)} |\n")
        assert cell.count("<tr>") == 2 and not re.search(r"<(a|b|strong|code)\b", cell), cell
    assert MarkdownIt().render(f"`{code_span('R&D <2024> `x`')}`") == "<p><code>R&amp;D &lt;2024&gt; 'x'</code></p>\n"


def test_macro_f1_averages_the_labels_in_truth_or_prediction_only():
    import numpy as np

    from kftune.metrics import classification_metrics, macro_f1

    y = np.array([0, 0, 2, 2])  # a file with no 'neutral' row, predicted perfectly
    assert macro_f1(y, y, 3) == 1.0
    m = classification_metrics(y, np.eye(3)[y], ["negative", "neutral", "positive"], 10)
    assert m["macro_f1"] == 1.0 and m["per_class"]["neutral"]["support"] == 0
    from kftune.steps.evaluate import render_report

    report = render_report({"test_rows": 4, "model": m, "baselines": {}})
    assert "| neutral | - | - | - | 0 |" in report, "not a label scoring 0: one the split does not have"
    assert macro_f1(y, np.array([0, 1, 2, 2]), 3) == pytest.approx((2 / 3 + 0 + 1) / 3), "a predicted label counts"


def test_metrics_agree_with_sklearn():
    import numpy as np
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from kftune.metrics import classification_metrics, label_confusion, macro_f1

    rng = np.random.default_rng(0)
    for n, true_labels, predicted_labels in ((4, 3, 4), (5, 2, 3), (3, 3, 1)):  # some labels in neither
        y, pred = rng.integers(0, true_labels, 300), rng.integers(0, predicted_labels, 300)
        seen = sorted(set(y) | set(pred))
        assert macro_f1(y, pred, n) == pytest.approx(f1_score(y, pred, average="macro", labels=seen, zero_division=0))
        m = classification_metrics(y, np.eye(n)[pred], [f"l{i}" for i in range(n)], 10)
        p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(n), zero_division=0)
        ours = [[c[k] for k in ("precision", "recall", "f1", "support")] for c in m["per_class"].values()]
        assert np.allclose(ours, np.stack([p, r, f, s], 1))
        assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(n)).tolist()
    with pytest.raises(ValueError, match=r"predicted label id 5 is not one of 0\.\.1"):
        macro_f1([0, 1], [0, 5], 2)
    with pytest.raises(ValueError, match=r"true label id 1\.5 is not one of 0\.\.1"):
        macro_f1([0, 1.5], [0, 1], 2)
    gold, guess = ["O", "B-PER", "I-PER", "O"], ["O", "B-PER", "O", "B-LOC"]
    assert label_confusion(gold, guess, ["O", "B-PER", "I-PER"]) == \
        confusion_matrix(gold, guess, labels=["O", "B-PER", "I-PER"]).tolist()


def test_the_confusion_matrix_of_150_labels_is_an_image_a_viewer_opens(tmp_path):
    from PIL import Image

    from kftune.steps.evaluate import _plot_confusion

    labels = [f"intent_{i:03d}" for i in range(150)]
    _plot_confusion(np.random.default_rng(0).integers(0, 5, (150, 150)).tolist(), labels, tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as image:
        assert max(image.size) <= 4000, image.size


def test_the_tfidf_baseline_reads_character_ngrams_when_no_text_has_a_word_of_two_letters(params, caplog):
    """Emoji reactions or single CJK characters are valid data: the word baseline's vocabulary would be empty."""
    from kftune.steps.evaluate import baseline_probs

    train = pd.DataFrame({"text": ["😀", "😀 😀", "好", "😡", "😡 😡", "差"] * 3,
                          "label": ["positive", "positive", "positive", "negative", "negative", "negative"] * 3})
    test = pd.DataFrame({"text": ["😀", "😡"], "label": ["positive", "negative"]})
    probs = baseline_probs(train, test, ["negative", "positive"], params.evaluate)
    assert probs["tfidf_logreg"].argmax(1).tolist() == [1, 0] and "character n-grams" in caplog.text
