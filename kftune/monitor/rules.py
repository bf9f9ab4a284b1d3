"""Alert rules: pure functions of a window of traffic, and the state machine that makes an alert fire once.

A rule is judged `failing`, `ok` or `unknown` (too little traffic to say); `unknown` keeps the rule's
previous state. An alert event is emitted only on a change: ok -> failing fires, failing -> ok resolves.
A rule with `for_checks: N` fires only at its N-th failing check in a row (Prometheus' `for`), trading
N - 1 checks of latency for no alert on a single noisy window; it resolves at the first ok check.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from kftune.config import AlertRule

FAILING, OK, UNKNOWN = "failing", "ok", "unknown"
FIRING, RESOLVED = "firing", "resolved"


@dataclass
class Verdict:
    rule: AlertRule
    status: str  # failing, ok, unknown
    value: float | None  # the measured quantity (a share, points, a drop, a count, a gap)
    requests: int  # predictions in the rule's window
    why: str


@dataclass
class Context:
    """What rules are judged against, besides the traffic."""

    reference_shares: dict  # label -> share of the champion's predictions on its held-out rows
    reference_confidence: float | None  # the champion's mean top-class probability on its held-out rows
    drifted: bool | None  # this check's drift vote (None: the drift tests did not run)
    drift_why: str
    live: dict  # live_quality() on the window's random-sample feedback
    test_accuracy: float | None  # the champion's accuracy on its test split
    ever_traffic: bool  # whether the log has any prediction at all before now
    labels: tuple = ()  # the champion's labels (empty: not known)


def cannot_fire(rule: AlertRule, labels) -> str | None:
    """Why `rule` can never fire against a champion with `labels`, or None."""
    if rule.kind == "label_share" and labels and rule.label not in labels:
        return f"the champion has no label {rule.label!r} (its labels: {', '.join(labels)}): this rule cannot fire"
    return None


def window(rows: pd.DataFrame, now: pd.Timestamp, seconds: float) -> pd.DataFrame:
    return rows[(rows["time"] > now - pd.Timedelta(seconds=seconds)) & (rows["time"] <= now)]


def judge(rule: AlertRule, rows: pd.DataFrame, now: pd.Timestamp, ctx: Context) -> Verdict:
    """One rule on the traffic of its window (rows: the champion's logged predictions; for volume, the model's)."""
    w = window(rows, now, rule.window)
    n = len(w)

    def verdict(failing: bool, value: float | None, why: str) -> Verdict:
        return Verdict(rule, FAILING if failing else OK, value, n, why)

    if rule.kind == "volume":
        if not ctx.ever_traffic:
            return Verdict(rule, UNKNOWN, n, n, "no prediction logged yet")
        least = max(rule.min_requests, 1)  # 0 reads as 1: no traffic at all
        return verdict(n < least, n, f"{n} predictions in the last {_dur(rule.window)} (at least {least} expected)")
    if rule.kind == "live_quality":
        live = ctx.live
        if live.get("n", 0) < max(rule.min_requests, 1) or ctx.test_accuracy is None:  # no accuracy of no labels
            return Verdict(rule, UNKNOWN, None, n, f"{live.get('n', 0)} random-sample labels, "
                                                   f"{rule.min_requests} needed")
        gap = ctx.test_accuracy - live["accuracy"]
        return verdict(live["accuracy_high"] < ctx.test_accuracy - rule.max_gap, gap,
                       f"live accuracy {live['accuracy']:.3f} [{live['accuracy_low']:.3f}, {live['accuracy_high']:.3f}] "
                       f"on {live['n']} random-sample labels vs test {ctx.test_accuracy:.3f}; alert when the interval "
                       f"lies more than {rule.max_gap:g} below the test score")
    needed = rule.min_requests if rule.kind == "drift" else max(rule.min_requests, 1)  # no share of nothing
    if n < needed:
        return Verdict(rule, UNKNOWN, None, n, f"{n} predictions in the last {_dur(rule.window)}, "
                                               f"{needed} needed")
    if rule.kind in ("label_share", "label_shift", "confidence") and w["label"].isna().all():
        return Verdict(rule, UNKNOWN, None, n, "a tagger's predictions have no label or confidence per text")
    if rule.kind == "label_share":
        if why_not := cannot_fire(rule, ctx.labels):  # ok, not unknown: an alert fired under an earlier champion
            return verdict(False, 0.0, why_not)       # that had the label resolves
        share = float((w["label"] == rule.label).mean())
        return verdict(share > rule.max_share, share, f"{rule.label} {share:.1%} of {n} predictions in the last "
                                                      f"{_dur(rule.window)} (max {rule.max_share:.0%})")
    if rule.kind == "label_shift":
        shares = w["label"].value_counts(normalize=True)
        moves = {lbl: 100 * (float(shares.get(lbl, 0.0)) - ref) for lbl, ref in ctx.reference_shares.items()}
        if not moves:
            return Verdict(rule, UNKNOWN, None, n, "no reference label shares yet (the drift tests have not run)")
        lbl = max(moves, key=lambda k: abs(moves[k]))
        return verdict(abs(moves[lbl]) > rule.max_points, abs(moves[lbl]),
                       f"{lbl} moved {moves[lbl]:+.1f} points from the reference (max {rule.max_points:g})")
    if rule.kind == "confidence":
        if ctx.reference_confidence is None:
            return Verdict(rule, UNKNOWN, None, n, "no reference confidence yet (the drift tests have not run)")
        drop = ctx.reference_confidence - float(w["probability"].mean())
        return verdict(drop > rule.max_drop, drop, f"mean confidence {float(w['probability'].mean()):.3f}, "
                                                   f"{drop:+.3f} below the reference {ctx.reference_confidence:.3f} "
                                                   f"(max drop {rule.max_drop:g})")
    if rule.kind == "drift":
        if ctx.drifted is None:
            return Verdict(rule, UNKNOWN, None, n, ctx.drift_why)
        return verdict(ctx.drifted, float(ctx.drifted), ctx.drift_why)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def transitions(verdicts: list[Verdict], previous: dict, now: str) -> tuple[dict, list[dict]]:
    """(the rules' new state, the alert events): an event only where a rule starts or stops failing."""
    state, events = dict(previous), []
    for v in verdicts:
        before = previous.get(v.rule.name, {})
        was = before.get("status", OK)
        if v.status == UNKNOWN:
            continue
        streak = before.get("failing_checks", 0) + 1 if v.status == FAILING else 0
        # failing at fewer checks in a row than for_checks: pending, not firing (a firing alert stays firing)
        status = FAILING if v.status == FAILING and (was == FAILING or streak >= v.rule.for_checks) else OK
        state[v.rule.name] = {"status": status, "since": now if status != was else before.get("since", now),
                              "value": v.value, "failing_checks": streak}
        if status != was:
            events.append({"alert": v.rule.name, "kind": v.rule.kind, "status": FIRING if status == FAILING
                           else RESOLVED, "value": v.value, "requests": v.requests, "at": now,
                           "why": v.why + (f" (failing at {streak} checks in a row)" if v.rule.for_checks > 1 and
                                           status == FAILING else "")})
    return state, events


def _dur(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
