"""Retraining steps for a token-classification champion: resolve, the drift tests on tagged text, and a
tag set that grows (trained from the base model and held for a person), with the tiny tagger."""

import dataclasses

import pandas as pd
import pytest

from kftune import registry
from kftune.gate import HOLD
from kftune.steps.drift import RETRAIN, SKIP, drift
from kftune.steps.evaluate import evaluate
from kftune.steps.finetune import finetune
from kftune.steps.register import register
from kftune.steps.resolve import FIRST_TRAINING, NEW_DATA, resolve
from kftune.steps.tokenize import tokenize
from kftune.tables import DataError
from tests.conftest import tiny_params, train_champion, use_mlflow_store, with_changes, write_conll
from tests.tagged import tagged_sentences


def tagger_params(tiny_model):
    p = tiny_params(tiny_model)
    return dataclasses.replace(p, task="token-classification",
                               register=with_changes(p.register, model_name="tiny-tagger"),
                               retrain=with_changes(p.retrain, cooldown_hours=0, min_new_test_rows=20),
                               finetune=with_changes(p.finetune, max_steps=200))


@pytest.fixture(scope="module")
def tagger(tmp_path_factory, tiny_model):
    """An MLflow store whose champion v1 is a tiny tagger trained on 800 sentences (data/old.conll)."""
    root = tmp_path_factory.mktemp("tagger")
    params = tagger_params(tiny_model)
    (root / "data").mkdir()
    write_conll(root / "data" / "old.conll", tagged_sentences(800))
    with pytest.MonkeyPatch.context() as mp:
        use_mlflow_store(root, mp)
        card = resolve(str(root / "data"), root / "r0", root / "c0", params)
        assert card["status"] == FIRST_TRAINING and card["task"] == "token-classification"
        assert card["label_distribution"]["train"]["B-per"] > 0 and set(card["entities"]["train"]) == {"org", "per"}
        train_champion(root, params, root / "r0")
        yield root, params


def with_batch(tagger, tmp_path, monkeypatch, name, sentences):
    """The champion's data plus one new CoNLL file, in a fresh folder; MLflow on the tagger's store."""
    import shutil

    import mlflow

    root, params = tagger
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    shutil.copytree(root / "data", tmp_path / "data")
    write_conll(tmp_path / "data" / f"{name}.conll", sentences)
    return tmp_path / "data", params


def test_new_entity_names_are_drift_and_an_iid_batch_is_not(tagger, tmp_path, monkeypatch):
    iid_dir, params = with_batch(tagger, tmp_path / "iid", monkeypatch, "iid", tagged_sentences(300, seed=3))
    card = resolve(str(iid_dir), tmp_path / "d1", tmp_path / "c1", params)
    assert card["status"] == NEW_DATA and card["new_rows"] == 300 and card["warm_start"] == "champion v1"
    hist = pd.read_parquet(tmp_path / "d1" / "historical_test.parquet")
    assert list(hist.columns) == ["text", "tokens", "tags"] and len(hist) == card["historical_test_rows"] > 0
    iid = drift(tmp_path / "d1", tmp_path / "c1", tmp_path / "r1", params)
    checks = iid["checks"]
    assert set(checks) == {"embedding", "prediction", "confidence", "entities", "vocabulary", "label"}
    assert not checks["entities"]["verdict"] and not checks["vocabulary"]["verdict"], checks
    assert iid["drift"] is False and iid["decision"] == SKIP, iid["reason"]

    new_dir, _ = with_batch(tagger, tmp_path / "new", monkeypatch, "new", tagged_sentences(300, seed=4, shifted=True))
    resolve(str(new_dir), tmp_path / "d2", tmp_path / "c2", params)
    shifted = drift(tmp_path / "d2", tmp_path / "c2", tmp_path / "r2", params)
    checks = shifted["checks"]
    entities = checks["entities"]["details"]
    assert entities["new_unseen_share"] > entities["reference_unseen_share"] + 0.3, entities  # fresh names
    assert checks["entities"]["verdict"] and checks["vocabulary"]["verdict"] and checks["embedding"]["verdict"]
    assert shifted["drift"] is True and shifted["decision"] == RETRAIN, shifted["reason"]
    assert (tmp_path / "r2" / "drift.png").exists() and "| entities |" in (tmp_path / "r2" / "report.md").read_text()


def test_a_grown_tag_set_trains_from_the_base_model_and_waits_for_a_person(tagger, tmp_path, monkeypatch):
    data, params = with_batch(tagger, tmp_path, monkeypatch, "loc",
                              tagged_sentences(400, seed=5, shifted=True, new_type=True))
    with pytest.raises(DataError, match=r"tags \['B-loc'\] that champion v1 .* retrain.allow_label_change=true"):
        resolve(str(data), tmp_path / "d", tmp_path / "c", params)
    params = dataclasses.replace(params, retrain=with_changes(params.retrain, allow_label_change=True))
    card = resolve(str(data), tmp_path / "d", tmp_path / "c", params)
    assert card["labels"] == ["O", "B-loc", "I-loc", "B-org", "I-org", "B-per", "I-per"]
    assert card["warm_start"].startswith("base: the label set changed")
    report = drift(tmp_path / "d", tmp_path / "c", tmp_path / "r", params)
    assert report["checks"]["label"]["verdict"], "a new gold entity type moves the gold distribution"
    tokenize(tmp_path / "d", tmp_path / "tok", params.model.name, params.tokenize)
    finetune(tmp_path / "tok", tmp_path / "m", params.model.name, params.finetune)
    metrics = evaluate(tmp_path / "d", tmp_path / "m", tmp_path / "e", params.evaluate)
    assert metrics["historical_rows"] == card["historical_test_rows"] and "entity_f1" in metrics["historical"]
    verdict = register(tmp_path / "d", tmp_path / "m", tmp_path / "e", tmp_path / "g", params)
    assert verdict.decision == HOLD and "champion-unscorable" in verdict.held_by, verdict.reasons
    assert "label-set change" in " ".join(verdict.reasons)
    name = params.register.model_name
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"
    assert [e.action for e in registry.history(name)][-1] == "hold"
