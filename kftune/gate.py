"""The gate: whether a challenger becomes champion, decided on numbers measured in one run, and the one
path that promotes.

Every number compared is measured here on this run's frozen test split: the challenger's (from
evaluate), the baseline's, and the champion's, re-scored now rather than copied from its old run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import pandas as pd

from kftune import registry
from kftune.config import Params
from kftune.hardware import bf16_for

log = logging.getLogger(__name__)

PROMOTE, HOLD, AWAITING = "promote", "hold", "awaiting-approval"
METRIC_NAMES = {"macro_f1": ("macro-F1", "TF-IDF baseline"), "entity_f1": ("entity F1", "memorization baseline")}


@dataclass
class Verdict:
    """The gate's decision on one challenger, with every number it compared and every reason."""

    decision: str
    version: str
    metric: str = "macro_f1"  # macro_f1, or entity_f1 for token classification
    challenger_score: float = 0.0  # test score (the new data's test split when retraining)
    baseline_score: float = 0.0  # the baseline's on the same split
    champion_version: str = ""  # the champion compared against ("" if none)
    champion_score: float | None = None
    challenger_historical_score: float | None = None  # retraining: on the frozen historical test split
    champion_historical_score: float | None = None
    challenger_golden_score: float | None = None  # register.golden_test, the fixed test file
    champion_golden_score: float | None = None
    # the champion trained or validated on some test rows (other split settings, given splits): both scored on
    # the `unseen_rows` it never saw
    unseen_rows: int | None = None
    challenger_unseen_score: float | None = None
    reasons: list[str] = field(default_factory=list)
    held_by: list[str] = field(default_factory=list)  # the rules that failed

    @property
    def reference_score(self) -> float:
        return self.baseline_score if self.champion_score is None else self.champion_score

    def to_dict(self) -> dict:
        return {**asdict(self), "reference_score": self.reference_score}


TIE = 1e-9  # a difference exactly at min_delta or max_forgetting passes, whatever the float rounding


def rule(v: Verdict, min_delta: float, max_forgetting: float, smoke_error: str | None = None,
         champion_error: str | None = None, golden_error: str | None = None) -> tuple[bool, list[str], list[str]]:
    """The decision rule, pure. Returns (passes, reasons with numbers, names of the rules that failed).

    A challenger must beat the baseline, unless the champion is itself below the baseline on this
    split: then beating the champion is enough (a failing champion is no reason to keep it).
    """
    name, base_name = METRIC_NAMES.get(v.metric, (v.metric, "baseline"))
    checks: list[tuple[str, bool, str]] = []
    if champion_error:
        checks.append(("champion-unscorable", False, f"the champion could not be scored on this test split, so "
                       f"nothing can be compared: {champion_error}; promote by hand with `kftune models promote` "
                       f"if this is intended"))
    ok = v.challenger_score > v.baseline_score
    failing_champion = v.champion_score is not None and v.champion_score <= v.baseline_score
    if not ok and failing_champion:
        checks.append(("baseline", True, f"test {name} {v.challenger_score:.4f} <= {base_name} "
                       f"{v.baseline_score:.4f}, but the champion ({v.champion_score:.4f}) is below it too, so the "
                       f"challenger is compared with the champion"))
    else:
        prefix = "no champion yet: " if v.champion_score is None and not champion_error else ""
        checks.append(("baseline", ok, f"{prefix}test {name} {v.challenger_score:.4f} {'>' if ok else '<='} "
                       f"{base_name} {v.baseline_score:.4f}"))
    if v.champion_score is not None:
        mine, where = (v.challenger_score, "on the same test split") if v.unseen_rows is None else \
            (v.challenger_unseen_score, f"on the {v.unseen_rows} test rows the champion never trained on")
        ok = mine - v.champion_score >= min_delta - TIE
        checks.append(("champion", ok, f"test {name} {mine:.4f} {'>=' if ok else '<'} champion "
                       f"{v.champion_score:.4f} + min_delta {min_delta:.4f} {where}"))
    for rule_name, where, champion, challenger in (
            ("forgetting", "historical test", v.champion_historical_score, v.challenger_historical_score),
            ("golden-test", "golden test", v.champion_golden_score, v.challenger_golden_score)):
        if champion is not None and challenger is not None:
            drop = champion - challenger
            ok = drop <= max_forgetting + TIE
            checks.append((rule_name, ok, f"{where} {name} {challenger:.4f} vs champion {champion:.4f}: drop "
                           f"{drop:.4f} {'<=' if ok else '>'} max_forgetting {max_forgetting:.4f}"))
    if golden_error:
        checks.append(("golden-test", False, f"golden test: {golden_error}"))
    checks.append(("smoke-test", not smoke_error, f"smoke test through the registry failed: {smoke_error}"
                   if smoke_error else "smoke test through the registry passed"))
    return (all(ok for _, ok, _ in checks), [why for _, _, why in checks],
            [rule_name for rule_name, ok, _ in checks if not ok])


def score_version(uri: str, tests: dict[str, pd.DataFrame], labels: list[str], params: Params) -> dict[str, float]:
    """A registered version's primary score (macro-F1, or entity F1 for tagged sentences) on each named test set."""
    from kftune.metrics import classification_metrics, entity_metrics
    from kftune.predict import labels_of, predict_proba_with, word_predictions

    bf16 = bf16_for(params.finetune)
    parts = registry.load_components(uri)
    if labels_of(parts["model"]) != labels:
        raise registry.RegistryError(f"it predicts labels {labels_of(parts['model'])}, this data has {labels} "
                                     f"(a label-set change)")
    out = {}
    for name, df in tests.items():
        if "tags" in df.columns:
            pred, _ = word_predictions(parts["model"], parts["tokenizer"], [list(t) for t in df["tokens"]],
                                       params.evaluate.batch_size, bf16)
            out[name] = entity_metrics([list(t) for t in df["tags"]], pred)["entity_f1"]
            continue
        probs = predict_proba_with(parts["model"], parts["tokenizer"], df["text"].tolist(), params.evaluate.batch_size,
                                   bf16)
        y = df["label"].map({lbl: i for i, lbl in enumerate(labels)}).to_numpy()
        out[name] = classification_metrics(y, probs, labels, params.evaluate.ece_bins)["macro_f1"]
    return out


def seen_by(name: str, version: str) -> set[str]:
    """The texts a registered version trained or validated on (its reference rows' train and validation splits).
    A version whose reference cannot be read counts as having seen none, with a warning."""
    import tempfile

    from kftune.steps.resolve import download_reference

    with tempfile.TemporaryDirectory() as tmp:
        try:
            rows, _ = download_reference(name, version, tmp)
        except Exception as exc:  # noqa: BLE001 - DataError: compared as before, on the whole split
            log.warning("cannot tell which test rows v%s trained on, so it is scored on all of them: %s", version, exc)
            return set()
    return set(rows.loc[rows["split"].isin(["train", "validation"]), "text"])


def smoke_test(uri: str, texts: list[str], labels: list[str], task: str) -> str | None:
    """Load the version by URI as a user would and predict; return an error message or None.

    Token classification: entity spans from the raw texts, each of a known type and whose text is
    exactly the characters between its offsets.
    """
    import mlflow

    try:
        if task == "token-classification":
            from kftune.predict import predict_spans

            parts = mlflow.transformers.load_model(uri, return_type="components")
            found = predict_spans(parts["model"], parts["tokenizer"], texts)
        else:
            out = mlflow.pyfunc.load_model(uri).predict(texts)
            got = list(out["label"]) if isinstance(out, pd.DataFrame) else [o["label"] for o in out]
    except Exception as exc:  # any failure here means users could not load it either
        return f"{type(exc).__name__}: {exc}"
    if task == "token-classification":
        types = {t[2:] for t in labels if t != "O"}
        bad = [e for text, ents in zip(texts, found) for e in ents
               if e["type"] not in types or text[e["start"]:e["end"]] != e["text"]]
        return f"malformed spans: {bad[:3]}" if bad or len(found) != len(texts) else None
    if len(got) != len(texts) or not set(got) <= set(labels):
        return f"expected {len(texts)} labels from {labels}, got {got}"
    return None


def judge(verdict: Verdict, params: Params, tests: dict[str, pd.DataFrame], labels: list[str], task: str,
          trained_on: set[str] = frozenset()) -> Verdict:
    """Score the champion on `tests` (test, historical when retraining, golden with register.golden_test: read and
    checked before the version was registered), smoke-test the challenger, apply the rule; fills the verdict's
    champion scores, decision and reasons. trained_on: the challenger's training and validation texts (golden rows
    among them are left out)."""
    cfg, tests = params.register, dict(tests)
    champion_error, golden_error, notes = None, None, []
    seen = seen_by(cfg.model_name, verdict.champion_version) if verdict.champion_version else set()
    if "golden" in tests:  # the fixed test set: both sides re-scored on it every time, on rows neither trained on
        golden = tests["golden"]
        kept = golden[~golden["text"].isin(seen | set(trained_on))]
        if len(kept) < len(golden):
            notes.append(f"golden test: {len(golden) - len(kept)} of its {len(golden)} rows left out, the challenger "
                         f"or the champion trained or validated on them")
        tests = {**tests, "golden": kept}
        if kept.empty:
            golden_error = "every row was training or validation data, so it cannot show what was forgotten"
            del tests["golden"]
        else:
            verdict.challenger_golden_score = score_version(f"models:/{cfg.model_name}/{verdict.version}",
                                                            {"golden": kept}, labels, params)["golden"]
    if verdict.champion_version:
        try:
            unseen = tests["test"][~tests["test"]["text"].isin(seen)]
            if len(unseen) < len(tests["test"]):  # its score on rows it trained on would be inflated
                if unseen.empty:
                    raise registry.RegistryError(f"it trained or validated on all {len(tests['test'])} test rows of "
                                                 f"this split (other ingest split settings, or given splits)")
                verdict.unseen_rows = len(unseen)
                verdict.challenger_unseen_score = score_version(f"models:/{cfg.model_name}/{verdict.version}",
                                                                {"test": unseen}, labels, params)["test"]
                tests = {**tests, "test": unseen}
            measured = score_version(f"models:/{cfg.model_name}/{verdict.champion_version}", tests, labels, params)
            verdict.champion_score, verdict.champion_historical_score = measured["test"], measured.get("historical")
            verdict.champion_golden_score = measured.get("golden")
        except Exception as exc:  # a champion we cannot score is a reason to hold, not to crash
            champion_error = f"v{verdict.champion_version}: {type(exc).__name__}: {exc}"
    smoke_error = smoke_test(f"models:/{cfg.model_name}/{verdict.version}",
                             tests["test"]["text"].head(cfg.smoke_examples).tolist(), labels, task)
    ok, verdict.reasons, verdict.held_by = rule(verdict, cfg.min_delta, cfg.max_forgetting, smoke_error,
                                                champion_error, golden_error)
    verdict.reasons += notes
    verdict.decision = (AWAITING if cfg.require_approval else PROMOTE) if ok else HOLD
    if verdict.decision == AWAITING:
        verdict.reasons.append(f"register.require_approval is true: approve with `kftune models promote "
                               f"{verdict.version} --reason ...`")
    return verdict


def record(name: str, verdict: Verdict, baseline: str) -> None:
    """Tag the verdict on the version (and the alias challenger); a hold or wait goes into the history. Under the
    registry lease, like moves: register steps of one model at once would race on the alias (MLflow's sqlite
    store fails one of them) and on the history's order."""
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = {"decision": verdict.decision, "reasons": " | ".join(verdict.reasons),
            "gated_against": verdict.champion_version,  # "" = no champion: what approval must still find
            # the score compared with: the champion's when it could be scored, else the baseline's
            "compared_with": f"v{verdict.champion_version}" if verdict.champion_score is not None else
            f"{baseline} baseline",
            "reference_score": f"{verdict.reference_score:.4f}", "held_by": ",".join(verdict.held_by)}
    with registry.lease(name):
        client.set_registered_model_alias(name, registry.CHALLENGER, verdict.version)  # once it has a decision
        for k, v in tags.items():
            client.set_model_version_tag(name, verdict.version, f"kftune.{k}", v[:5000])  # MLflow's tag limit
        if verdict.decision != PROMOTE:
            registry.record(verdict.decision, name, verdict.champion_version, verdict.version,
                            " | ".join(verdict.reasons))


def promote(name: str, version: str, reason: str, who: str | None = None,
            expected_champion: str | None = "any", keep_versions: int = 0) -> registry.Event:
    """The one path that makes a version champion: from the pipeline, `kftune step register` and approval.

    keep_versions (register.keep_versions): > 0 prunes the registry to that many versions afterwards.
    """
    event = registry.promote(name, version, reason, who=who, expected_champion=expected_champion)
    if keep_versions:
        try:
            gone = registry.prune(name, keep_versions)
        except Exception as exc:  # noqa: BLE001 - the champion has moved: a failed cleanup must not fail the run
            log.warning("register.keep_versions=%d: pruning failed (the promotion stands; the next one prunes "
                        "again): %s: %s", keep_versions, type(exc).__name__, exc)
            return event
        log.info("register.keep_versions=%d: deleted %s", keep_versions, ", ".join(f"v{v}" for v in gone) or "nothing")
    return event


def approve(name: str, version: str, reason: str, force: bool = False, keep_versions: int = 0) -> registry.Event:
    """A person promotes a version. One awaiting approval is promoted only if the champion is still the one
    it was gated against, unless forced."""
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = client.get_model_version(name, version).tags
    expected = "any"
    if tags.get("kftune.decision") == AWAITING and not force:
        if "kftune.gated_against" not in tags:
            raise registry.RegistryError(f"{name} v{version} awaits approval but does not record the champion it "
                                         f"was gated against; pass --force to promote it anyway")
        expected = tags["kftune.gated_against"]
    event = promote(name, version, reason, expected_champion=expected, keep_versions=keep_versions)
    client.set_model_version_tag(name, version, "kftune.approved_by", event.actor)
    return event
