import dataclasses

import pytest
import mlflow
from mlflow import MlflowClient

from kftune import registry
from kftune.gate import AWAITING, HOLD, PROMOTE
from tests.conftest import train_and_register, with_changes


def test_champion_challenger_with_real_numbers(prepared, params, mlflow_store):
    name = params.register.model_name
    good, d1 = train_and_register(prepared, params, "good")
    assert d1.decision == PROMOTE and d1.version == "1" and d1.champion_version == ""
    assert d1.reference_score == pytest.approx(good["baselines"]["tfidf_logreg"]["macro_f1"])
    registry.promote(name, d1.version, "gate", expected_champion=d1.champion_version)

    bad, d2 = train_and_register(prepared, params, "bad", max_steps=2)
    assert d2.decision == HOLD and d2.champion_version == "1"
    # both sides measured now, on the same test split: the champion is re-scored, not compared with itself
    assert d2.challenger_score == pytest.approx(bad["model"]["macro_f1"])
    assert d2.reference_score == pytest.approx(good["model"]["macro_f1"])
    assert d2.challenger_score < d2.reference_score
    assert f"champion {good['model']['macro_f1']:.4f}" in d2.reasons[1]

    assert registry.version_by_alias(name, registry.CHAMPION) == "1"
    assert registry.version_by_alias(name, registry.CHALLENGER) == "2"
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["kftune.decision"] == HOLD and tags["kftune.compared_with"] == "v1"
    assert tags["kftune.data_sha256"] and tags["kftune.params_hash"] == params.digest()
    assert [(e.action, e.from_version, e.to_version) for e in registry.history(name)] == [
        ("promote", None, "1"), ("hold", "1", "2")]

    run = MlflowClient().get_run(tags["kftune.run_id"])
    assert run.data.metrics["champion_test_macro_f1"] == pytest.approx(good["model"]["macro_f1"])
    assert run.data.params["finetune.max_steps"] == str(params.finetune.max_steps)


def test_approval_manual_promotion_and_rollback(prepared, params, mlflow_store):
    name = params.register.model_name
    _, d1 = train_and_register(prepared, params, "first")
    registry.promote(name, d1.version, "gate")
    approval = dataclasses.replace(params, register=with_changes(params.register, require_approval=True,
                                                                  min_delta=-1.0))
    _, d2 = train_and_register(prepared, approval, "second", seed=7)
    assert d2.decision == AWAITING
    assert registry.version_by_alias(name, registry.CHAMPION) == "1", "approval pending: no move"

    registry.promote(name, d2.version, "reviewed the report")
    assert registry.version_by_alias(name, registry.CHAMPION) == "2"
    assert registry.version_by_alias(name, registry.PREVIOUS) == "1"

    registry.rollback(name, "bad outputs in production")
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"
    assert registry.version_by_alias(name, registry.PREVIOUS) is None
    with pytest.raises(registry.RegistryError, match="no previous-champion"):
        registry.rollback(name, "again")
    assert [e.action for e in registry.history(name)] == ["promote", "awaiting-approval", "promote", "rollback"]
    assert registry.history(name)[-1].reason == "bad outputs in production"


def test_promotion_refuses_when_the_champion_moved_since_the_gate(prepared, params, mlflow_store):
    name = params.register.model_name
    _, d1 = train_and_register(prepared, params, "first")
    registry.promote(name, d1.version, "gate", expected_champion="")
    with pytest.raises(registry.RegistryError, match="champion moved: was vnone when the gate ran, now v1"):
        registry.promote(name, d1.version, "stale gate", expected_champion="")
    assert registry.history(name)[-1].action == "refuse"


def test_a_retraining_resolved_without_a_champion_is_gated_against_none(prepared, params, mlflow_store):
    """resolve saw no champion (card champion_version ""); one was promoted before register ran: the gate
    judges against none, as the run was planned, and the promotion is refused."""
    from kftune.fileio import read_json, write_json

    name = params.register.model_name
    _, d1 = train_and_register(prepared, params, "first")
    card = read_json(prepared / "data" / "data_card.json")
    write_json(prepared / "data" / "data_card.json", {**card, "champion_version": ""})
    registry.promote(name, d1.version, "another run promoted meanwhile")
    _, d2 = train_and_register(prepared, params, "second", max_steps=2)
    assert d2.champion_version == "" and d2.champion_score is None
    with pytest.raises(registry.RegistryError, match="champion moved: was vnone when the gate ran, now v1"):
        registry.promote(name, d2.version, "gate", expected_champion=d2.champion_version)
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"


def test_prune_keeps_the_protected_versions_and_frees_the_weights(prepared, params, mlflow_store):
    from pathlib import Path

    name = params.register.model_name
    for i in range(4):
        _, d = train_and_register(prepared, params, f"m{i}", max_steps=20, seed=i)
        if i == 0:
            registry.promote(name, d.version, "first")
    # v1 champion, v4 challenger; v2 and v3 are old holds
    client = MlflowClient()
    model_id = registry.logged_model_id(client.get_model_version(name, "2"))
    weights = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    assert weights.exists()
    assert registry.prune(name, keep=1) == ["2"]
    assert [v["version"] for v in registry.list_versions(name)] == ["1", "3", "4"]
    assert not weights.exists(), "the weights went with the version"
    assert registry.prune(name, keep=1) == []


def test_a_webhook_url_in_the_settings_is_never_logged_nor_hashed(prepared, params, mlflow_store):
    monitor = dataclasses.replace(params.monitor, webhook_url="https://hooks.example.com/services/T0/B0/s3cret")
    with_hook = dataclasses.replace(params, monitor=monitor)
    assert with_hook.digest() == params.digest(), "where alerts go is no setting of the model"
    _, verdict = train_and_register(prepared, with_hook, "hooked", max_steps=2)
    client = MlflowClient()
    run_id = client.get_model_version(params.register.model_name, verdict.version).tags["kftune.run_id"]
    logged = client.get_run(run_id).data.params
    saved = mlflow.artifacts.load_text(f"runs:/{run_id}/params.yaml")
    assert logged["monitor.webhook_url"] == "https://hooks.example.com/..." and "hooks.example.com/..." in saved
    assert "s3cret" not in saved and not any("s3cret" in v for v in logged.values())


def test_any_label_or_rule_name_makes_a_key_mlflow_accepts_and_no_two_share_one(mlflow_store):
    from kftune.tracking import key_part

    names = ["c++", "c--", "a/", "what's up", "😀", "a/../b", "x" * 300, "négatif", "neutral"]
    keys = [f"test_f1_{key_part(n)}" for n in names]
    assert len(set(keys)) == len(names) and key_part("négatif") == "négatif" and key_part("neutral") == "neutral"
    with mlflow.start_run(experiment_id=mlflow.set_experiment("keys").experiment_id) as run:  # this store's
        mlflow.log_metrics({k: 1.0 for k in keys})
        mlflow.set_tags({f"kftune.alert.{key_part(n)}": "firing" for n in names})
    assert set(keys) <= set(MlflowClient().get_run(run.info.run_id).data.metrics)
