"""`kftune score`: a registered tiny model scored on files whose labels are its own predictions with a known
number changed, so accuracy, the confusion matrix and entity F1 have answers known before scoring."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from kftune.cli import main
from kftune.registry import load_components
from kftune.predict import labels_of, predict_proba_with, word_predictions
from kftune.score import score
from kftune.tables import DataError

from .conftest import ner_sentences, subword_texts, train_and_register, write_conll


@pytest.fixture
def registered(prepared, params, mlflow_store):
    from kftune import registry

    _, verdict = train_and_register(prepared, params, "m1", max_steps=60)
    registry.promote(params.register.model_name, verdict.version, "test", expected_champion=None)
    return verdict.version


def test_score_texts_on_a_file_with_known_mistakes(tmp_path, params, registered):
    parts = load_components(f"models:/{params.register.model_name}/{registered}")
    labels = labels_of(parts["model"])
    texts = subword_texts(40, seed=5)["text"].tolist()
    predicted = [labels[i] for i in predict_proba_with(parts["model"], parts["tokenizer"], texts).argmax(1)]
    flip = {0, 3, 7, 11, 19}  # five rows labelled against the model: 35 of 40 right
    gold = [labels[1 - labels.index(p)] if i in flip else p for i, p in enumerate(predicted)]
    pd.DataFrame({"text": texts, "label": gold}).to_json(tmp_path / "golden.jsonl", orient="records", lines=True)

    out = tmp_path / "scores" / "metrics.json"
    assert main(["score", "--model", f"{params.register.model_name}@champion", "--input",
                 str(tmp_path / "golden.jsonl"), "--output", str(out), "--params", str(_params_file(tmp_path, params))]) == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["version"] == registered and result["rows"] == 40
    assert m["accuracy"] == pytest.approx(35 / 40)
    matrix = m["confusion_matrix"]
    assert sum(map(sum, matrix)) == 40 and matrix[0][1] + matrix[1][0] == 5
    for i, lbl in enumerate(labels):  # per-class F1 from the matrix by hand
        tp, fp, fn = matrix[i][i], matrix[1 - i][i], matrix[i][1 - i]
        assert m["per_class"][lbl]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["macro_f1"] == pytest.approx(sum(c["f1"] for c in m["per_class"].values()) / 2)
    assert score(f"{params.register.model_name}/{registered}", str(tmp_path / "golden.jsonl"), params,
                 log_run=False)["metrics"] == m


def test_score_is_an_mlflow_run_linked_to_the_version_with_baselines(tmp_path, params, registered):
    import mlflow

    from kftune.registry import logged_model_id

    name = params.register.model_name
    texts = subword_texts(40, seed=5)
    texts.to_csv(tmp_path / "golden.csv", index=False)
    train = pd.DataFrame({"text": subword_texts(60, seed=8)["text"], "label": ["positive"] * 45 + ["negative"] * 15})
    train.to_csv(tmp_path / "train.csv", index=False)

    result = score(name, str(tmp_path / "golden.csv"), params, train=str(tmp_path / "train.csv"))
    majority = result["baselines"]["majority"]  # every row called positive, the training majority
    share = (texts["label"] == "positive").mean()
    assert majority["accuracy"] == pytest.approx(share)
    assert majority["macro_f1"] == pytest.approx((2 * share / (1 + share)) / 2)
    assert set(result["baselines"]) == {"majority", "tfidf_logreg"} and result["train"]["rows"] == 60

    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["kftune.kind"] == "score" and run.data.tags["kftune.version"] == registered
    assert run.data.metrics["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert run.data.metrics["majority_macro_f1"] == pytest.approx(majority["macro_f1"])
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["golden.csv"]
    mv = mlflow.MlflowClient().get_model_version(name, registered)
    linked = {(x.key, x.dataset_name) for x in mlflow.MlflowClient().get_logged_model(logged_model_id(mv)).metrics}
    assert ("macro_f1", "golden.csv") in linked  # shown on the model's page, beside the file it was scored on


def test_score_says_which_labels_and_columns_are_wrong(tmp_path, params, registered):
    name = params.register.model_name
    pd.DataFrame({"text": ["gainoku the", "lossira the", "x"], "label": ["positive", "neutral", "neutral"]}).to_csv(
        tmp_path / "odd.csv", index=False)
    with pytest.raises(DataError, match=r"odd.csv: column 'label' has labels 'neutral' \(2\) are not among "
                                        rf"{name} v{registered}'s labels \['negative', 'positive'\]"):
        score(name, str(tmp_path / "odd.csv"), params)
    pd.DataFrame({"sentence": ["a"], "label": ["positive"]}).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(DataError, match=r"cols.csv: no text column 'text' \(columns: sentence, label\); set "
                                        r"ingest.text_column"):
        score(name, str(tmp_path / "cols.csv"), params)
    # a --train file of one label cannot train the TF-IDF baseline: said, not sklearn's ValueError
    pd.DataFrame({"text": ["gainoku the", "a b"], "label": ["positive", "positive"]}).to_csv(tmp_path / "one.csv",
                                                                                             index=False)
    with pytest.raises(DataError, match="--train .*one.csv: every row has the label 'positive'; a TF-IDF baseline "
                                        "needs at least two labels"):
        score(name, str(tmp_path / "one.csv"), params, train=str(tmp_path / "one.csv"))


def test_score_tagged_sentences_against_known_entities(tmp_path, params, mlflow_store):
    from kftune.steps.ingest import ingest
    from kftune.steps.tokenize import tokenize

    ner = dataclasses.replace(params, task="token-classification",
                              register=dataclasses.replace(params.register, model_name="tiny-ner"))
    ingest(str(write_conll(tmp_path / "train.conll", ner_sentences(400))), tmp_path / "data", ner.ingest,
           task=ner.task)
    tokenize(tmp_path / "data", tmp_path / "tokenized", ner.model.name, ner.tokenize)
    _, verdict = train_and_register(tmp_path, ner, "m1", max_steps=40)

    parts = load_components(f"models:/tiny-ner/{verdict.version}")
    sentences = ner_sentences(30, seed=9)
    tokens = [t for t, _ in sentences]
    predicted, _ = word_predictions(parts["model"], parts["tokenizer"], tokens)
    # gold = the model's own tags, plus one extra one-word `per` entity on an O word of the first 4 sentences
    gold = [list(p) for p in predicted]
    added = 0
    for tags in gold:
        spot = next((i for i, t in enumerate(tags) if t == "O"), None)  # valid IOB2: no I- follows an O
        if spot is not None and added < 4:
            tags[spot], added = "B-per", added + 1
    write_conll(tmp_path / "gold.conll", list(zip(tokens, gold)))

    result = score(f"tiny-ner/{verdict.version}", str(tmp_path / "gold.conll"), ner)
    m = result["metrics"]
    n_pred = sum(tag.startswith("B-") for tags in predicted for tag in tags)
    assert result["task"] == "token-classification" and result["rows"] == 30
    assert m["precision"] == pytest.approx(1.0 if n_pred else 0.0) and m["recall"] == pytest.approx(n_pred / (n_pred + 4))
    words = sum(map(len, tokens))
    assert m["token_accuracy"] == pytest.approx((words - 4) / words)
    labels = result["labels"]
    assert m["confusion_matrix"][labels.index("B-per")][labels.index("O")] == 4

    write_conll(tmp_path / "bad.conll", [(["a", "b"], ["B-loc", "O"])])
    with pytest.raises(DataError, match=r"bad.conll: tags 'B-loc' \(1\) are not among tiny-ner v1's labels"):
        score(f"tiny-ner/{verdict.version}", str(tmp_path / "bad.conll"), ner)


def _params_file(tmp_path, params):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path
