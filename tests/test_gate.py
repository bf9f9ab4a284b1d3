"""The gate's rule on known numbers: every branch, every reason, and which rule held."""

from kftune.gate import Verdict, rule


def v(challenger, baseline, champion=None, challenger_hist=None, champion_hist=None, metric="macro_f1"):
    return Verdict("hold", "2", metric, challenger, baseline, "1" if champion is not None else "", champion,
                   challenger_hist, champion_hist)


def test_a_first_model_must_beat_the_baseline():
    ok, why, held = rule(v(0.80, 0.75), 0.0, 0.02)
    assert ok and not held and "no champion yet: test macro-F1 0.8000 > TF-IDF baseline 0.7500" in why[0]
    ok, _, held = rule(v(0.75, 0.75), 0.0, 0.02)
    assert not ok and held == ["baseline"], "must beat the baseline, not tie it"


def test_a_challenger_must_beat_the_champion_by_min_delta():
    ok, why, _ = rule(v(0.805, 0.5, champion=0.80), 0.005, 0.02)
    assert ok and "0.8050 >= champion 0.8000 + min_delta 0.0050" in why[1]
    ok, _, held = rule(v(0.804, 0.5, champion=0.80), 0.005, 0.02)
    assert not ok and held == ["champion"]


def test_a_champion_below_the_baseline_is_no_reason_to_keep_it():
    # the challenger is below the baseline, but the champion it would replace is further below
    ok, why, held = rule(v(0.776, 0.818, champion=0.692), 0.005, 0.02)
    assert ok and not held and "the champion (0.6920) is below it too" in why[0]
    ok, _, held = rule(v(0.80, 0.818, champion=0.83), 0.005, 0.02)
    assert not ok and held == ["baseline", "champion"], "a champion above the baseline keeps the baseline rule"
    ok, _, held = rule(v(0.695, 0.818, champion=0.692), 0.005, 0.02)
    assert not ok and held == ["champion"], "it must still beat the failing champion by min_delta"
    ok, _, held = rule(v(0.80, 0.80, champion=0.80), 0.0, 0.02)
    assert ok and not held, "a champion level with the baseline is not above it: the baseline rule is waived"


def test_the_smoke_test_and_an_unscorable_champion_hold():
    ok, why, held = rule(v(0.99, 0.5), 0.0, 0.02, "OSError: no weights")
    assert not ok and held == ["smoke-test"] and "smoke test through the registry failed: OSError" in why[-1]
    ok, why, held = rule(v(0.99, 0.5), 0.0, 0.02, None, champion_error="v1: OSError: gone")
    assert not ok and held == ["champion-unscorable"] and "could not be scored" in why[0]


def test_forgetting_rule():
    ok, why, _ = rule(v(0.90, 0.6, champion=0.70, challenger_hist=0.885, champion_hist=0.90), 0.005, 0.02)
    assert ok and "historical test macro-F1 0.8850 vs champion 0.9000: drop 0.0150 <= max_forgetting 0.0200" in why[2]
    ok, why, held = rule(v(0.90, 0.6, champion=0.70, challenger_hist=0.87, champion_hist=0.90), 0.005, 0.02)
    assert not ok and held == ["forgetting"] and "drop 0.0300 > max_forgetting" in why[2]


def test_entity_f1_names_the_memorization_baseline():
    _, why, _ = rule(v(0.7, 0.2, metric="entity_f1"), 0.0, 0.02)
    assert "test entity F1 0.7000 > memorization baseline 0.2000" in why[0]


def test_a_difference_exactly_at_the_limit_passes_despite_float_rounding():
    assert 0.3 < 0.2 + 0.1 and 0.9 - 0.88 > 0.02  # what exact float comparisons would get wrong
    ok, why, _ = rule(v(0.3, 0.1, champion=0.2), 0.1, 0.02)
    assert ok and "0.3000 >= champion 0.2000 + min_delta 0.1000" in why[1]
    ok, _, held = rule(v(0.95, 0.5, champion=0.8, challenger_hist=0.88, champion_hist=0.9), 0.0, 0.02)
    assert ok and not held


def test_the_model_card_names_the_baseline_when_the_champion_could_not_be_scored():
    from kftune.card import model_card

    metrics = {"primary": "macro_f1", "labels": ["neg", "pos"], "baseline": "tfidf_logreg", "test_rows": 40,
               "model": {"macro_f1": 0.8, "accuracy": 0.8}, "baselines": {"tfidf_logreg": {"macro_f1": 0.61,
                                                                                          "accuracy": 0.6}}}
    unscorable = v(0.8, 0.61)
    unscorable.champion_version, unscorable.decision = "5", "hold"  # judged, but v5 could not be scored
    card = model_card("m", "6", "bert-tiny", {}, metrics, unscorable, "abc", "run")
    assert "against the tfidf_logreg baseline 0.6100" in card and "champion v5 0.61" not in card


def test_the_champion_is_compared_only_on_test_rows_it_never_trained_on():
    ok, why, held = rule(Verdict("hold", "2", "macro_f1", 0.80, 0.5, "1", 0.83, unseen_rows=40,
                                 challenger_unseen_score=0.84), 0.005, 0.02)
    assert ok and not held and "0.8400 >= champion 0.8300 + min_delta 0.0050 on the 40 test rows the champion " \
                               "never trained on" in why[1]


def test_a_champion_that_trained_on_this_test_split_is_scored_on_the_rest(mlflow_store, tiny_model, tmp_path):
    """Other split settings put most of the champion's training rows into this run's test split: scored there it
    would look better than it is and hold a better challenger. Both are scored on the rows it never saw."""
    import dataclasses

    import pandas as pd

    from kftune import registry
    from kftune.steps.resolve import reference_rows
    from tests.conftest import subword_texts, tiny_params, with_changes
    from tests.serving.conftest import _register, _train

    params = tiny_params(tiny_model)
    subword_texts(300).to_csv(tmp_path / "texts.csv", index=False)
    _train(tmp_path / "v1", tmp_path / "texts.csv", params, steps=4)
    registry.promote(params.register.model_name, _register(tmp_path / "v1", params), "first")
    salted = dataclasses.replace(params, ingest=with_changes(params.ingest, split_salt="another salt"))
    _train(tmp_path / "v2", tmp_path / "texts.csv", salted, steps=4)
    _register(tmp_path / "v2", salted)
    decision = pd.read_json(next((tmp_path / "v2").glob("gate-*/decision.json")), typ="series")
    first, test = reference_rows(tmp_path / "v1" / "data"), pd.read_parquet(tmp_path / "v2" / "data" / "test.parquet")
    unseen = (~test["text"].isin(first.loc[first["split"] != "test", "text"])).sum()
    assert 0 < unseen < len(test) and decision["unseen_rows"] == unseen
    assert any(f"on the {unseen} test rows the champion never trained on" in r for r in decision["reasons"])
