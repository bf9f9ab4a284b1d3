import dataclasses

import pytest
from mlflow import MlflowClient

from kftune import registry
from kftune.steps.evaluate import evaluate
from kftune.steps.finetune import finetune
from kftune.steps.register import AWAITING, HOLD, PROMOTE, Scores, gate, register
from tests.conftest import with_changes


def test_gate_rule():
    ok, why = gate(Scores(0.80, 0.75), 0.0, 0.02, None)
    assert ok and "no champion yet: test macro-F1 0.8000 > TF-IDF baseline 0.7500" in why[0]
    assert not gate(Scores(0.75, 0.75), 0.0, 0.02, None)[0], "must beat the baseline, not tie it"
    ok, why = gate(Scores(0.805, 0.5, champion=0.80), 0.005, 0.02, None)
    assert ok and "0.8050 >= champion 0.8000 + min_delta 0.0050" in why[1]
    assert not gate(Scores(0.804, 0.5, champion=0.80), 0.005, 0.02, None)[0]
    assert not gate(Scores(0.90, 0.95, champion=0.80), 0.005, 0.02, None)[0], "a champion is no excuse below baseline"
    ok, why = gate(Scores(0.99, 0.5), 0.0, 0.02, "OSError: no weights")
    assert not ok and "smoke test through the registry failed: OSError: no weights" in why[-1]


def test_gate_forgetting_rule():
    remembers = Scores(0.90, 0.6, champion=0.70, challenger_historical=0.885, champion_historical=0.90)
    ok, why = gate(remembers, 0.005, 0.02, None)
    assert ok and "historical test macro-F1 0.8850 vs champion 0.9000: drop 0.0150 <= max_forgetting 0.0200" in why[2]
    forgets = Scores(0.90, 0.6, champion=0.70, challenger_historical=0.87, champion_historical=0.90)
    ok, why = gate(forgets, 0.005, 0.02, None)
    assert not ok and "drop 0.0300 > max_forgetting" in why[2], "better on new data, but forgot the old"


def train_and_register(root, params, name, **finetune_changes):
    finetune(root / "tokenized", root / name, params.model.name, with_changes(params.finetune, **finetune_changes))
    metrics = evaluate(root / "data", root / name, root / f"{name}-eval", params.evaluate)
    decision = register(root / "data", root / name, root / f"{name}-eval", root / f"{name}-gate", params)
    return metrics, decision


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
    with pytest.raises(registry.RegistryError, match="champion moved from vnone to v1"):
        registry.promote(name, d1.version, "stale gate", expected_champion="")
    assert registry.history(name)[-1].action == "refuse"
