"""The alert state machine: an alert fires once on a change, and `for_checks` holds it back until the rule has
failed at that many checks in a row."""

import pandas as pd
import pytest

from kftune.config import ConfigError, load_params, parse_rules
from kftune.monitor.rules import FIRING, RESOLVED, Context, judge, transitions
from tests.conftest import ROOT

CTX = Context(reference_shares={}, reference_confidence=None, drifted=None, drift_why="", live={},
              test_accuracy=None, ever_traffic=True)
NOW = pd.Timestamp("2026-12-05 12:00", tz="UTC")


def hour_of(negative_share: float) -> pd.DataFrame:
    n = 100
    labels = ["negative"] * int(n * negative_share) + ["positive"] * (n - int(n * negative_share))
    return pd.DataFrame({"time": [NOW - pd.Timedelta(minutes=1)] * n, "label": labels})


def events_over(shares: list[float | None], for_checks: int) -> list[tuple[int, str]]:
    (rule,), problems = parse_rules([{"name": "surge", "kind": "label_share", "label": "negative", "max_share": 0.4,
                                      "window": "1h", "min_requests": 50, "for_checks": for_checks}])
    assert not problems
    state, seen = {}, []
    for i, share in enumerate(shares):
        rows = hour_of(share) if share is not None else hour_of(0.5).head(10)  # None: too little traffic
        state, events = transitions([judge(rule, rows, NOW, CTX)], state, f"check {i}")
        seen += [(i, e["status"]) for e in events]
    return seen


def test_an_alert_fires_once_at_the_first_failing_check_and_resolves_once():
    assert events_over([0.2, 0.6, 0.7, None, 0.6, 0.2, 0.2], for_checks=1) == [(1, FIRING), (5, RESOLVED)]


def test_for_checks_ignores_a_single_bad_window_and_fires_at_the_nth_failing_check_in_a_row():
    # single bad hours (1, 3, 5) are forgiven; an unknown check (6) neither counts nor breaks a run, so the
    # run 5, 7 fires at 7; the first ok check resolves
    shares = [0.2, 0.6, 0.2, 0.6, 0.2, 0.6, None, 0.7, 0.8, 0.2]
    assert events_over(shares, for_checks=2) == [(7, FIRING), (9, RESOLVED)]
    assert events_over(shares, for_checks=1) == [(1, FIRING), (2, RESOLVED), (3, FIRING), (4, RESOLVED),
                                                 (5, FIRING), (9, RESOLVED)]


def test_the_firing_event_says_for_how_many_checks():
    (rule,), _ = parse_rules([{"name": "surge", "kind": "label_share", "label": "negative", "max_share": 0.4,
                               "window": "1h", "min_requests": 50, "for_checks": 2}])
    state, first = transitions([judge(rule, hour_of(0.6), NOW, CTX)], {}, "a")
    _, second = transitions([judge(rule, hour_of(0.6), NOW, CTX)], state, "b")
    assert first == [] and state["surge"]["failing_checks"] == 1
    assert second[0]["status"] == FIRING and second[0]["why"].endswith("(failing at 2 checks in a row)")


@pytest.mark.parametrize("value", ["0", "1.5", "two", "true"])
def test_a_bad_for_checks_is_named(value):
    rule = f"[{{name: s, kind: volume, window: 1h, min_requests: 1, for_checks: {value}}}]"
    with pytest.raises(ConfigError, match=r"monitor.rules\[0\].for_checks=.*must be a whole number >= 1"):
        load_params(ROOT / "params.yaml", [f"monitor.rules={rule}"])


def test_min_requests_0_judges_no_share_of_an_empty_window():
    rules, problems = parse_rules([
        {"name": "surge", "kind": "label_share", "label": "negative", "max_share": 0.4, "window": "1h",
         "min_requests": 0},
        {"name": "shift", "kind": "label_shift", "max_points": 20, "window": "1h", "min_requests": 0},
        {"name": "conf", "kind": "confidence", "max_drop": 0.1, "window": "1h", "min_requests": 0}])
    assert not problems
    ctx = Context(reference_shares={"negative": 0.7, "positive": 0.3}, reference_confidence=0.9, drifted=None,
                  drift_why="", live={}, test_accuracy=None, ever_traffic=True)
    empty = pd.DataFrame({"time": pd.Series([], dtype="datetime64[ns, UTC]"), "label": [], "probability": []})
    assert [judge(r, empty, NOW, ctx).status for r in rules] == ["unknown"] * 3
    one = pd.DataFrame({"time": [NOW], "label": ["negative"], "probability": [0.5]})
    assert [judge(r, one, NOW, ctx).status for r in rules] == ["failing"] * 3


def test_min_requests_0_on_volume_and_live_quality():
    """volume: 0 reads as 1, so an empty window fails; live_quality: no labels is unknown, not a crash."""
    rules, problems = parse_rules([
        {"name": "quiet", "kind": "volume", "window": "1h", "min_requests": 0},
        {"name": "live", "kind": "live_quality", "max_gap": 0.05, "window": "1h", "min_requests": 0}])
    assert not problems
    ctx = Context(reference_shares={}, reference_confidence=None, drifted=None, drift_why="", live={"n": 0},
                  test_accuracy=0.9, ever_traffic=True)
    empty = pd.DataFrame({"time": pd.Series([], dtype="datetime64[ns, UTC]"), "label": [], "probability": []})
    assert [judge(r, empty, NOW, ctx).status for r in rules] == ["failing", "unknown"]


def test_a_label_share_rule_on_a_label_the_champion_lacks_is_ok_and_says_it_cannot_fire():
    import dataclasses

    (rule,), _ = parse_rules([{"name": "typo", "kind": "label_share", "label": "negatve", "max_share": 0.0,
                               "window": "1h", "min_requests": 1}])
    known = dataclasses.replace(CTX, labels=("negative", "positive"))
    verdict = judge(rule, hour_of(0.5), NOW, known)
    assert verdict.status == "ok" and verdict.why.startswith("the champion has no label 'negatve'")
    # an alert that fired under a champion with that label resolves under one without it
    state, events = transitions([verdict], {"typo": {"status": "failing", "failing_checks": 3}}, "now")
    assert [e["status"] for e in events] == [RESOLVED] and state["typo"]["status"] == "ok"
