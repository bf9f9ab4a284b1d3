"""register.golden_test: the gate re-scores champion and challenger on the fixed file and holds a regression."""

from __future__ import annotations

import dataclasses

import pytest
from mlflow import MlflowClient

from kftune import registry
from kftune.local import preflight
from kftune.score import score
from kftune.tables import DataError

from .conftest import subword_texts, train_and_register


def test_the_gate_scores_both_sides_on_the_golden_test_and_holds_a_regression(tmp_path, prepared, params,
                                                                              mlflow_store):
    name = params.register.model_name
    _, first = train_and_register(prepared, params, "champion")
    registry.promote(name, first.version, "test", expected_champion=None)
    golden = tmp_path / "golden.csv"
    subword_texts(200, seed=21).to_csv(golden, index=False)

    gated = dataclasses.replace(params, register=dataclasses.replace(params.register, golden_test=str(golden),
                                                                     min_delta=-1.0))
    _, verdict = train_and_register(prepared, gated, "weak", max_steps=2)  # barely trained: forgets
    champion_f1 = score(f"{name}/{first.version}", str(golden), params)["metrics"]["macro_f1"]
    challenger_f1 = score(f"{name}/{verdict.version}", str(golden), params)["metrics"]["macro_f1"]
    assert verdict.champion_golden_score == champion_f1 and verdict.challenger_golden_score == challenger_f1
    assert champion_f1 - challenger_f1 > params.register.max_forgetting
    assert "golden-test" in verdict.held_by and verdict.decision == "hold"
    assert any(r.startswith("golden test macro-F1") for r in verdict.reasons)


def test_a_golden_test_with_unknown_labels_fails_before_anything_is_registered(tmp_path, prepared, params,
                                                                               subword_csv, mlflow_store):
    golden = tmp_path / "golden.csv"
    subword_texts(20, seed=21).assign(label="bullish").to_csv(golden, index=False)
    gated = dataclasses.replace(params, register=dataclasses.replace(params.register, golden_test=str(golden)))
    message = rf"register.golden_test={golden}: labels \['bullish'\] are not among the model's"
    with pytest.raises(DataError, match=message):  # `kftune run`: before training
        preflight(str(subword_csv), gated)
    with pytest.raises(DataError, match=message):  # a cluster run: in its ingest task, before the fine-tune
        from kfp import dsl

        from components.ingest import ingest_op

        ingest_op.python_func(data_path=str(subword_csv), data_repo="", data_rev="", data_hash="",
                              params=gated.to_dict(), data=dsl.Dataset(uri=str(tmp_path / "ingested")))
    with pytest.raises(DataError, match=message):  # a retraining run: before registering
        train_and_register(prepared, gated, "never", max_steps=1)
    assert not MlflowClient().search_model_versions(f"name='{params.register.model_name}'")


def test_golden_rows_either_side_trained_on_are_left_out_and_all_of_them_hold(tmp_path, prepared, params,
                                                                             mlflow_store):
    """A golden file cut from earlier labelled batches overlaps the training data: scored there, the challenger
    would look as if it forgot nothing. Those rows are left out, and a file that is all training rows holds."""
    import pandas as pd

    name = params.register.model_name
    _, first = train_and_register(prepared, params, "champion", max_steps=4)
    registry.promote(name, first.version, "test", expected_champion=None)
    train = pd.read_parquet(prepared / "data" / "train.parquet")
    golden = tmp_path / "golden.csv"
    pd.concat([train[["text", "label"]].head(30), subword_texts(20, seed=21)]).to_csv(golden, index=False)
    gated = dataclasses.replace(params, register=dataclasses.replace(params.register, golden_test=str(golden),
                                                                     min_delta=-1.0, max_forgetting=1.0))
    _, verdict = train_and_register(prepared, gated, "second", max_steps=4)
    unseen = tmp_path / "unseen.csv"
    subword_texts(20, seed=21).to_csv(unseen, index=False)
    assert verdict.challenger_golden_score == score(f"{name}/{verdict.version}", str(unseen), params)["metrics"][
        "macro_f1"]
    assert "golden test: 30 of its 50 rows left out, the challenger or the champion trained or validated on them" \
        in verdict.reasons and "golden-test" not in verdict.held_by
    train[["text", "label"]].head(30).to_csv(golden, index=False)
    _, verdict = train_and_register(prepared, gated, "third", max_steps=4)
    assert "golden-test" in verdict.held_by and verdict.decision == "hold"
    assert "golden test: every row was training or validation data" in " ".join(verdict.reasons)
