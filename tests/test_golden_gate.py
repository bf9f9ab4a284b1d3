"""register.golden_test: the gate re-scores champion and challenger on the fixed file and holds a regression."""

from __future__ import annotations

import dataclasses

import pandas as pd

from kftune import registry
from kftune.score import score

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
