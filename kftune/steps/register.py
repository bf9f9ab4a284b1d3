"""register: log the run and the model to MLflow, register a version, and decide on promotion.

The gate compares numbers measured here, on this run's frozen test split: the challenger's and
the champion's (re-scored now, not copied from its old run), or the TF-IDF baseline's when there
is no champion yet. Promotion itself (moving aliases) is the separate `promote` step, which the
pipeline runs only under `dsl.If(decision == "promote")`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from kftune import registry
from kftune.config import Params
from kftune.fileio import read_json, write_json
from kftune.hardware import bf16_for

log = logging.getLogger(__name__)

PROMOTE, HOLD, AWAITING = "promote", "hold", "awaiting-approval"


@dataclass
class Decision:
    decision: str
    version: str
    reasons: list[str] = field(default_factory=list)
    champion_version: str = ""  # the champion the gate compared against ("" if none)
    metric: str = "macro_f1"  # what the scores are: macro_f1, or entity_f1 for token classification
    challenger_score: float = 0.0
    reference_score: float = 0.0  # champion's or baseline's, on the same test split
    challenger_historical_score: float | None = None  # retraining: on the frozen historical test split
    champion_historical_score: float | None = None


@dataclass
class Scores:
    """Everything the gate compares, all measured in this run on the same splits."""

    challenger: float  # test macro-F1 (the new data's test split when retraining)
    baseline: float  # the TF-IDF baseline's, on the same split
    champion: float | None = None
    challenger_historical: float | None = None
    champion_historical: float | None = None
    metric: str = "macro-F1"
    baseline_name: str = "TF-IDF baseline"


def gate(s: Scores, min_delta: float, max_forgetting: float, smoke_error: str | None,
         champion_error: str | None = None) -> tuple[bool, list[str]]:
    """Pure decision rule. Returns (passes, reasons with numbers)."""
    checks: list[tuple[bool, str]] = []
    if champion_error:
        checks.append((False, f"the champion could not be scored on this test split, so nothing can be compared: "
                              f"{champion_error}; promote by hand with `kftune models promote` if this is intended"))
    ok = s.challenger > s.baseline
    prefix = "no champion yet: " if s.champion is None and not champion_error else ""
    checks.append((ok, f"{prefix}test {s.metric} {s.challenger:.4f} {'>' if ok else '<='} {s.baseline_name} {s.baseline:.4f}"))
    if s.champion is not None:
        ok = s.challenger >= s.champion + min_delta
        checks.append((ok, f"test {s.metric} {s.challenger:.4f} {'>=' if ok else '<'} champion {s.champion:.4f} "
                           f"+ min_delta {min_delta:.4f} on the same test split"))
    if s.champion_historical is not None and s.challenger_historical is not None:
        drop = s.champion_historical - s.challenger_historical
        ok = drop <= max_forgetting
        checks.append((ok, f"historical test {s.metric} {s.challenger_historical:.4f} vs champion "
                           f"{s.champion_historical:.4f}: drop {drop:.4f} {'<=' if ok else '>'} max_forgetting "
                           f"{max_forgetting:.4f}"))
    checks.append((not smoke_error, f"smoke test through the registry failed: {smoke_error}" if smoke_error
                   else "smoke test through the registry passed"))
    return all(ok for ok, _ in checks), [why for _, why in checks]


def score_version(uri: str, tests: dict[str, pd.DataFrame], labels: list[str], params: Params) -> dict[str, float]:
    """A registered version's primary score (macro-F1, or entity F1 for tagged sentences) on each named test set."""
    import mlflow

    from kftune.ner import entity_metrics
    from kftune.predict import labels_of, predict_proba_with, word_predictions
    from kftune.steps.evaluate import classification_metrics

    bf16 = bf16_for(params.finetune)
    parts = mlflow.transformers.load_model(uri, return_type="components")
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


def _smoke_test(uri: str, texts: list[str], labels: list[str], task: str) -> str | None:
    """Load the version by URI as a user would and predict; return an error message or None.

    Token classification: entity spans from the raw texts, each of a known type and whose text is
    exactly the characters between its offsets.
    """
    import mlflow

    if task == "token-classification":
        from kftune.predict import predict_spans

        types = {t[2:] for t in labels if t != "O"}
        try:
            parts = mlflow.transformers.load_model(uri, return_type="components")
            found = predict_spans(parts["model"], parts["tokenizer"], texts)
        except Exception as exc:  # any failure here means users could not load it either
            return f"{type(exc).__name__}: {exc}"
        bad = [e for text, ents in zip(texts, found) for e in ents
               if e["type"] not in types or text[e["start"]:e["end"]] != e["text"]]
        return f"malformed spans: {bad[:3]}" if bad or len(found) != len(texts) else None
    try:
        out = mlflow.pyfunc.load_model(uri).predict(texts)
        got = list(out["label"]) if isinstance(out, pd.DataFrame) else [o["label"] for o in out]
    except Exception as exc:  # any failure here means users could not load it either
        return f"{type(exc).__name__}: {exc}"
    if len(got) != len(texts) or not set(got) <= set(labels):
        return f"expected {len(texts)} labels from {labels}, got {got}"
    return None


def _log_inputs(data_dir: Path, card: dict) -> None:
    """Record the train and test splits as MLflow dataset inputs, pointing at where the data came from."""
    import mlflow

    lineage = card.get("lineage", {})
    source = lineage.get("data_path", "")
    if lineage.get("data_commit"):
        source = f"{lineage['data_repo']}@{lineage['data_commit']}:{source}"
    for split, context in (("train", "training"), ("test", "testing")):
        df = pd.read_parquet(data_dir / f"{split}.parquet")
        targets = "label" if "label" in df.columns else None
        df = df if targets else df[["text"]]  # tagged sentences: the text (list columns have no MLflow schema)
        dataset = mlflow.data.from_pandas(df, source=source, targets=targets, name=f"{split}-{card['sha256'][:12]}")
        mlflow.log_input(dataset, context=context)


def _log_reference(data_dir: Path, card: dict) -> None:
    """Save every row of this data version with the model, as the next retraining's reference."""
    import tempfile

    import mlflow

    from kftune.steps.resolve import REFERENCE, reference_rows

    with tempfile.TemporaryDirectory() as tmp:
        reference_rows(data_dir).to_parquet(Path(tmp) / "rows.parquet")
        write_json(Path(tmp) / "card.json", {k: card.get(k) for k in ("labels", "split_salt", "split", "lineage", "sha256")})
        mlflow.log_artifacts(tmp, REFERENCE)


def _log_model(model_dir: Path, name: str, example: list[str], task: str):
    import mlflow
    import torch
    import transformers
    from mlflow.models import infer_signature

    hf_task = "token-classification" if task == "token-classification" else "text-classification"
    pipe = transformers.pipeline(hf_task, model=str(model_dir), tokenizer=str(model_dir), device="cpu")
    # text classification: one label per text; tagged sentences: mlflow's own signature for the task
    signature = infer_signature(example, pd.DataFrame(pipe(example))) if hf_task == "text-classification" else None
    return mlflow.transformers.log_model(
        transformers_model=pipe, name="model", task=hf_task, registered_model_name=name,
        signature=signature, input_example=example,
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"transformers=={transformers.__version__}",
                          f"torch=={torch.__version__.split('+')[0]}", "tokenizers", "safetensors"],
    )


def register(data_dir: str | Path, model_dir: str | Path, eval_dir: str | Path, out_dir: str | Path,
             params: Params, run_id: str = "", git_commit: str = "unknown") -> Decision:
    """Log everything to one MLflow run, register a model version and decide whether it should be champion.

    Args:
        data_dir: ingest output (data_card.json, test.parquet).
        model_dir: fine-tune output.
        eval_dir: evaluate output (metrics.json, report.md, confusion_matrix.*).
        out_dir: folder for decision.json.
        params: all settings (every key is logged as a run param).
        run_id: MLflow run to continue (the fine-tune step's); empty starts a new one.
        git_commit: code version tagged on the run and the model version.

    Returns:
        The decision; PROMOTE means the pipeline's promote step should move `champion`.
    """
    import mlflow

    from kftune.tracking import configure, experiment_id, flatten

    configure()
    data_dir, model_dir, eval_dir = Path(data_dir), Path(model_dir), Path(eval_dir)
    card, metrics = read_json(data_dir / "data_card.json"), read_json(eval_dir / "metrics.json")
    test = pd.read_parquet(data_dir / "test.parquet")
    labels = metrics["labels"]
    cfg = params.register
    tags = {"kftune.data_sha256": card["sha256"], "kftune.git_commit": git_commit,
            "kftune.params_hash": params.digest(),
            **{f"kftune.{k}": str(v) for k, v in card.get("lineage", {}).items()},
            **{f"kftune.{k}": str(card[k]) for k in ("warm_start", "new_rows", "replayed_rows") if k in card}}

    exp = experiment_id(cfg.experiment)
    with mlflow.start_run(run_id=run_id or None, experiment_id=None if run_id else exp) as run:
        mlflow.set_tags(tags)
        if not run_id:
            mlflow.log_params(flatten(params.to_dict()))
        primary, task = metrics.get("primary", "macro_f1"), card.get("task", "sequence-classification")
        model_m, base_m = metrics["model"], metrics["baselines"][metrics.get("baseline", "tfidf_logreg")]
        scalar = lambda m: {k: v for k, v in m.items() if isinstance(v, (int, float))}  # noqa: E731
        mlflow.log_metrics({f"test_{k}": v for k, v in scalar(model_m).items()})
        mlflow.log_metrics({f"baseline_{b}_{k}": v for b, m in metrics["baselines"].items()
                            for k, v in scalar(m).items()})
        per = model_m.get("per_class") or model_m.get("per_type", {})
        mlflow.log_metrics({f"test_f1_{lbl}": c["f1"] for lbl, c in per.items()})
        mlflow.log_artifact(str(data_dir / "data_card.json"))
        mlflow.log_dict(params.to_dict(), "params.yaml")
        _log_inputs(data_dir, card)
        for f in sorted(eval_dir.iterdir()):
            mlflow.log_artifact(str(f), "evaluation")
        for f in ("training_history.json", "train_summary.json"):
            if (model_dir / f).exists():
                mlflow.log_artifact(str(model_dir / f), "training")
        _log_reference(data_dir, card)

        info = _log_model(model_dir, cfg.model_name, test["text"].head(3).tolist(), task)
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        for k, v in {**tags, f"kftune.test_{primary}": f"{model_m[primary]:.4f}",
                     "kftune.run_id": run.info.run_id}.items():
            client.set_model_version_tag(cfg.model_name, version, k, v)

        hist = metrics.get("historical")
        names = {"macro_f1": ("macro-F1", "TF-IDF baseline"), "entity_f1": ("entity F1", "memorization baseline")}
        scores = Scores(model_m[primary], base_m[primary], challenger_historical=hist and hist[primary],
                        metric=names[primary][0], baseline_name=names[primary][1])
        if hist:
            mlflow.log_metric(f"historical_test_{primary}", hist[primary])
            client.set_model_version_tag(cfg.model_name, version, f"kftune.historical_{primary}", f"{hist[primary]:.4f}")
        # retraining pins the champion in resolve (drift and warm start used it); promote refuses if it moved
        champion = card.get("champion_version") or registry.version_by_alias(cfg.model_name, registry.CHAMPION)
        champion_error = None
        if champion:
            tests = {"test": test}
            if hist:
                tests["historical"] = pd.read_parquet(data_dir / "historical_test.parquet")
            try:
                measured = score_version(f"models:/{cfg.model_name}/{champion}", tests, labels, params)
                scores.champion, scores.champion_historical = measured["test"], measured.get("historical")
                mlflow.log_metrics({f"champion_{k}_{primary}": v for k, v in
                                    {"test": scores.champion, "historical_test": scores.champion_historical}.items()
                                    if v is not None})
            except Exception as exc:  # a champion we cannot score is a reason to hold, not to crash
                champion_error = f"v{champion}: {type(exc).__name__}: {exc}"
        uri = f"models:/{cfg.model_name}/{version}"
        smoke_error = _smoke_test(uri, test["text"].head(cfg.smoke_examples).tolist(), labels, task)
        ok, reasons = gate(scores, cfg.min_delta, cfg.max_forgetting, smoke_error, champion_error)
        outcome = (AWAITING if cfg.require_approval else PROMOTE) if ok else HOLD
        if outcome == AWAITING:
            reasons.append("register.require_approval is true: approve with `kftune models promote "
                           f"{version} --reason ...`")
        decision = Decision(outcome, version, reasons, champion or "", primary, scores.challenger,
                            scores.baseline if scores.champion is None else scores.champion,
                            scores.challenger_historical, scores.champion_historical)
        client.set_registered_model_alias(cfg.model_name, registry.CHALLENGER, version)  # once it has a decision
        for k, v in {"decision": outcome, "reasons": " | ".join(reasons),
                     "compared_with": f"v{decision.champion_version}" if champion else f"{metrics.get('baseline', 'tfidf_logreg')} baseline",
                     "reference_score": f"{decision.reference_score:.4f}"}.items():
            client.set_model_version_tag(cfg.model_name, version, f"kftune.{k}", v[:5000])  # MLflow's tag limit
        mlflow.set_tag("kftune.decision", outcome)
        mlflow.log_dict(asdict(decision), "decision.json")
    if card.get("lineage", {}).get("retrain_run_id"):  # the retraining run that asked for this challenger
        for k, v in {"challenger_version": version, "decision": outcome}.items():
            client.set_tag(card["lineage"]["retrain_run_id"], f"kftune.{k}", v)

    if outcome != PROMOTE:
        registry.record(outcome, cfg.model_name, decision.champion_version, version, " | ".join(reasons))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / "decision.json", asdict(decision))
    log.info("register: %s v%s: %s", outcome, version, "; ".join(reasons))
    return decision
