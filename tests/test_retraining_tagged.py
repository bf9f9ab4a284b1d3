"""End to end: the retraining pipeline through kfp.local for a token-classification champion (tiny tagger)."""

import pytest
from mlflow import MlflowClient

from kftune.config import load_params
from kftune.data import DATASET, add_batches
from kftune.local import run_retraining_local
from kftune.steps.resolve import resolve
from tests.conftest import train_champion, write_conll
from tests.tagged import tagged_sentences

pytestmark = pytest.mark.slow
SETTINGS = ["task=token-classification", "register.model_name=tiny-tagger", "retrain.cooldown_hours=0",
            "retrain.min_new_test_rows=20", "retrain.learning_rate=2e-3"]  # the tiny model needs its fresh rate


def add(project, name, sentences, params):
    path = write_conll(project.parent / f"{name}.conll", sentences)
    add_batches([str(path)], project, params.ingest, tag=name, task=params.task)


def test_tagger_retraining_skips_an_iid_batch_and_follows_new_entities(project):
    params = load_params(project / "params.yaml", SETTINGS)
    name = params.register.model_name
    add(project, "batch-0", tagged_sentences(800), params)
    # the first champion through the steps in-process, as in test_retraining: its reference rows are batch-0
    resolve(str(project / DATASET), project.parent / "r0", project.parent / "c0", params)
    train_champion(project.parent, params, project.parent / "r0")

    add(project, "iid", tagged_sentences(300, seed=3), params)
    iid = run_retraining_local(params, project)
    assert (iid["status"], iid["new_rows"], iid["drift"], iid["retrain"]) == ("new-data", 300, "false", "skip"), iid
    assert iid["drift_scores"]["entities_flag"] == 0 and iid["champion"] == "1"

    add(project, "new-entities", tagged_sentences(400, seed=4, shifted=True), params)
    new = run_retraining_local(params, project)
    assert (new["status"], new["new_rows"], new["drift"], new["retrain"]) == ("new-data", 700, "true", "retrain"), new
    assert new["drift_scores"]["entities_flag"] == 1 and new["drift_scores"]["vocabulary_flag"] == 1
    assert new["decision"] == "promote" and new["champion"] == new["challenger_version"] == "2", new
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["kftune.warm_start"] == "champion v1" and int(tags["kftune.replayed_rows"]) > 0
    assert "historical test entity F1" in tags["kftune.reasons"], tags["kftune.reasons"]
    new_f1, champion_f1 = float(tags["kftune.test_entity_f1"]), float(tags["kftune.reference_score"])
    assert new_f1 > champion_f1 + 0.15, "the new names broke the old champion and the challenger learned them"
    assert float(tags["kftune.historical_entity_f1"]) > 0.9, "and it still tags the old sentences"
