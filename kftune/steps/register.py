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

log = logging.getLogger(__name__)

PROMOTE, HOLD, AWAITING = "promote", "hold", "awaiting-approval"


@dataclass
class Decision:
    decision: str
    version: str
    reasons: list[str] = field(default_factory=list)
    champion_version: str = ""  # the champion the gate compared against ("" if none)
    challenger_macro_f1: float = 0.0
    reference_macro_f1: float = 0.0  # champion's or baseline's, on the same test split


def gate(challenger_f1: float, baseline_f1: float, champion_f1: float | None, min_delta: float,
         smoke_error: str | None, champion_error: str | None = None) -> tuple[bool, list[str]]:
    """Pure decision rule. Returns (passes, reasons with numbers)."""
    reasons = []
    if champion_error:
        ok = False
        reasons.append(f"the champion could not be scored on this test split, so nothing can be compared: "
                       f"{champion_error}; promote by hand with `kftune models promote` if this is intended")
    elif champion_f1 is None:
        ok = challenger_f1 > baseline_f1
        reasons.append(f"no champion yet: test macro-F1 {challenger_f1:.4f} "
                       f"{'>' if ok else '<='} TF-IDF baseline {baseline_f1:.4f}")
    else:
        ok = challenger_f1 >= champion_f1 + min_delta
        reasons.append(f"test macro-F1 {challenger_f1:.4f} {'>=' if ok else '<'} champion {champion_f1:.4f} "
                       f"+ min_delta {min_delta:.4f} on the same test split")
    if smoke_error:
        ok = False
        reasons.append(f"smoke test through the registry failed: {smoke_error}")
    else:
        reasons.append("smoke test through the registry passed")
    return ok, reasons


def _score_champion(uri: str, test: pd.DataFrame, labels: list[str], params: Params) -> float:
    import mlflow

    from kftune.predict import labels_of, predict_proba_with
    from kftune.steps.evaluate import classification_metrics

    parts = mlflow.transformers.load_model(uri, return_type="components")
    if labels_of(parts["model"]) != labels:
        raise registry.RegistryError(f"it predicts labels {labels_of(parts['model'])}, this data has {labels} "
                                     f"(a label-set change)")
    probs = predict_proba_with(parts["model"], parts["tokenizer"], test["text"].tolist(), params.evaluate.batch_size)
    y = test["label"].map({lbl: i for i, lbl in enumerate(labels)}).to_numpy()
    return classification_metrics(y, probs, labels, params.evaluate.ece_bins)["macro_f1"]


def _smoke_test(uri: str, texts: list[str], labels: list[str]) -> str | None:
    """Load the version by URI as a user would and predict; return an error message or None."""
    import mlflow

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
        dataset = mlflow.data.from_pandas(df, source=source, targets="label", name=f"{split}-{card['sha256'][:12]}")
        mlflow.log_input(dataset, context=context)


def _log_model(model_dir: Path, name: str, example: list[str]):
    import mlflow
    import torch
    import transformers
    from mlflow.models import infer_signature

    pipe = transformers.pipeline("text-classification", model=str(model_dir), tokenizer=str(model_dir),
                                 device="cpu")
    signature = infer_signature(example, pd.DataFrame(pipe(example)))
    return mlflow.transformers.log_model(
        transformers_model=pipe, name="model", task="text-classification", registered_model_name=name,
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
            **{f"kftune.{k}": str(v) for k, v in card.get("lineage", {}).items()}}

    exp = experiment_id(cfg.experiment)
    with mlflow.start_run(run_id=run_id or None, experiment_id=None if run_id else exp) as run:
        mlflow.set_tags(tags)
        if not run_id:
            mlflow.log_params(flatten(params.to_dict()))
        model_m, tfidf_m = metrics["model"], metrics["baselines"]["tfidf_logreg"]
        mlflow.log_metrics({f"test_{k}": model_m[k] for k in ("accuracy", "macro_f1", "ece")})
        mlflow.log_metrics({f"baseline_{b}_{k}": m[k] for b, m in metrics["baselines"].items()
                            for k in ("accuracy", "macro_f1")})
        mlflow.log_metrics({f"test_f1_{lbl}": c["f1"] for lbl, c in model_m["per_class"].items()})
        mlflow.log_artifact(str(data_dir / "data_card.json"))
        mlflow.log_dict(params.to_dict(), "params.yaml")
        _log_inputs(data_dir, card)
        for f in sorted(eval_dir.iterdir()):
            mlflow.log_artifact(str(f), "evaluation")
        for f in ("training_history.json", "train_summary.json"):
            if (model_dir / f).exists():
                mlflow.log_artifact(str(model_dir / f), "training")

        info = _log_model(model_dir, cfg.model_name, test["text"].head(3).tolist())
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        for k, v in {**tags, "kftune.test_macro_f1": f"{model_m['macro_f1']:.4f}",
                     "kftune.run_id": run.info.run_id}.items():
            client.set_model_version_tag(cfg.model_name, version, k, v)

        champion = registry.version_by_alias(cfg.model_name, registry.CHAMPION)
        champion_f1, champion_error = None, None
        if champion:
            try:
                champion_f1 = _score_champion(f"models:/{cfg.model_name}/{champion}", test, labels, params)
                mlflow.log_metric("champion_test_macro_f1", champion_f1)
            except Exception as exc:  # a champion we cannot score is a reason to hold, not to crash
                champion_error = f"v{champion}: {type(exc).__name__}: {exc}"
        uri = f"models:/{cfg.model_name}/{version}"
        smoke_error = _smoke_test(uri, test["text"].head(cfg.smoke_examples).tolist(), labels)
        ok, reasons = gate(model_m["macro_f1"], tfidf_m["macro_f1"], champion_f1, cfg.min_delta, smoke_error,
                           champion_error)
        outcome = (AWAITING if cfg.require_approval else PROMOTE) if ok else HOLD
        if outcome == AWAITING:
            reasons.append("register.require_approval is true: approve with `kftune models promote "
                           f"{version} --reason ...`")
        decision = Decision(outcome, version, reasons, champion or "",
                            model_m["macro_f1"], tfidf_m["macro_f1"] if champion_f1 is None else champion_f1)
        client.set_registered_model_alias(cfg.model_name, registry.CHALLENGER, version)  # once it has a decision
        for k, v in {"decision": outcome, "reasons": " | ".join(reasons),
                     "compared_with": f"v{decision.champion_version}" if champion else "tfidf_logreg baseline",
                     "reference_macro_f1": f"{decision.reference_macro_f1:.4f}"}.items():
            client.set_model_version_tag(cfg.model_name, version, f"kftune.{k}", v[:5000])  # MLflow's tag limit
        mlflow.set_tag("kftune.decision", outcome)
        mlflow.log_dict(asdict(decision), "decision.json")

    if outcome != PROMOTE:
        registry.record(outcome, cfg.model_name, decision.champion_version, version, " | ".join(reasons))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / "decision.json", asdict(decision))
    log.info("register: %s v%s: %s", outcome, version, "; ".join(reasons))
    return decision
