"""register: log the run and the model to MLflow, register a version, let the gate decide, and measure
which precision the version should be served at on this machine (kftune.serving.model).

The rule and the champion's scoring live in kftune.gate. Promotion itself (moving aliases) is the
separate `promote` step, which the pipeline runs only under `dsl.If(decision == "promote")`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from kftune import gate, registry
from kftune.card import publish
from kftune.config import Params
from kftune.fileio import read_json, write_json
from kftune.progress import Progress
from kftune.serving.model import measure_at_registration

log = logging.getLogger(__name__)


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}


def _log_run(data_dir: Path, model_dir: Path, eval_dir: Path, card: dict, metrics: dict, params: Params,
             tags: dict, new_run: bool) -> None:
    """Tags, params, test and baseline metrics, the data card, evaluation and training records, the inputs."""
    import mlflow

    from kftune.metrics import unscored
    from kftune.tracking import flatten, key_part, redacted

    mlflow.set_tags(tags)
    if new_run:
        mlflow.log_params(flatten(redacted(params.to_dict())))
    model_m = metrics["model"]
    mlflow.log_metrics({f"test_{k}": v for k, v in _scalars(model_m).items()})
    mlflow.log_metrics({f"baseline_{b}_{k}": v for b, m in metrics["baselines"].items() for k, v in _scalars(m).items()})
    per = model_m.get("per_class") or model_m.get("per_type", {})
    mlflow.log_metrics({f"test_f1_{key_part(lbl)}": c["f1"] for lbl, c in per.items() if not unscored(c)})
    if metrics.get("historical"):
        mlflow.log_metric(f"historical_test_{metrics['primary']}", metrics["historical"][metrics["primary"]])
    mlflow.log_artifact(str(data_dir / "data_card.json"))
    mlflow.log_dict(redacted(params.to_dict()), "params.yaml")
    _log_inputs(data_dir, card)
    for f in sorted(eval_dir.iterdir()):
        mlflow.log_artifact(str(f), "evaluation")
    for f in ("training_history.json", "train_summary.json"):
        if (model_dir / f).exists():
            mlflow.log_artifact(str(model_dir / f), "training")
    _log_reference(data_dir, card)


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
    """Log and register the model: (a LoRA version's base folder or None, the logged model's info)."""
    import mlflow
    import torch
    import transformers
    from mlflow.models import infer_signature

    hf_task = "token-classification" if task == "token-classification" else "text-classification"
    model_dir = model_dir.resolve()  # a relative path would be taken for a Hugging Face hub id
    import importlib.metadata

    from kftune.lora import adapter_pipeline

    # LoRA: the adapter alone (a small version) over a local base folder; otherwise the full weights
    pipe, base_path = adapter_pipeline(model_dir, hf_task) or (
        transformers.pipeline(hf_task, model=str(model_dir), tokenizer=str(model_dir), device="cpu"), None)
    # text classification: one label per text; tagged sentences: mlflow's own signature for the task
    signature = infer_signature(example, pd.DataFrame(pipe(example))) if hf_task == "text-classification" else None
    return base_path, mlflow.transformers.log_model(
        transformers_model=pipe, name="model", task=hf_task, registered_model_name=name,
        signature=signature, input_example=example, base_model_path=base_path,
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"transformers=={transformers.__version__}",
                          f"torch=={torch.__version__.split('+')[0]}", "tokenizers", "safetensors"]
                         + ([f"peft=={importlib.metadata.version('peft')}"] if base_path else []),
    )


def register(data_dir: str | Path, model_dir: str | Path, eval_dir: str | Path, out_dir: str | Path,
             params: Params, run_id: str = "", git_commit: str = "unknown") -> gate.Verdict:
    """Log everything to one MLflow run, register a model version and let the gate decide on it.

    Args:
        data_dir: ingest output (data_card.json, test.parquet; historical_test.parquet when retraining).
        model_dir: fine-tune output.
        eval_dir: evaluate output (evaluation.json, report.md, confusion_matrix.*).
        out_dir: folder for decision.json.
        params: all settings (every key is logged as a run param).
        run_id: MLflow run to continue (the fine-tune step's); empty starts a new one.
        git_commit: code version tagged on the run and the model version.

    Returns:
        The verdict; PROMOTE means the pipeline's promote step should move `champion`.
    """
    import mlflow

    from kftune.tracking import configure, experiment_id, finish_run, owner_tags

    configure()
    data_dir, model_dir, eval_dir = Path(data_dir), Path(model_dir), Path(eval_dir)
    card, metrics = read_json(data_dir / "data_card.json"), read_json(eval_dir / "evaluation.json")
    test = pd.read_parquet(data_dir / "test.parquet")
    cfg, primary, task = params.register, metrics["primary"], card.get("task", "sequence-classification")
    tags = {"kftune.data_sha256": card["sha256"], "kftune.git_commit": git_commit, **owner_tags(),
            "kftune.params_hash": params.digest(),
            **{f"kftune.{k}": str(v) for k, v in card.get("lineage", {}).items()},
            **{f"kftune.{k}": str(card[k]) for k in ("warm_start", "new_rows", "replayed_rows") if k in card}}
    hist = metrics.get("historical")
    tests = {"test": test}
    if hist:
        tests["historical"] = pd.read_parquet(data_dir / "historical_test.parquet")
    trained: set[str] = set()  # the challenger's training and validation texts: the golden test leaves them out
    if cfg.golden_test:  # read and checked before anything is registered
        from kftune.splits import check_golden, read_golden

        tests["golden"] = read_golden(cfg.golden_test, params.ingest, task)
        check_golden(tests["golden"], metrics["labels"], cfg.golden_test)
        trained = {t for s in ("train", "validation") for t in pd.read_parquet(data_dir / f"{s}.parquet")["text"]}
    progress = Progress("register", 4, "parts (run, model, gate, card)", every=0)
    with mlflow.start_run(run_id=run_id or None, experiment_id=None if run_id else experiment_id(cfg.experiment)) as run:
        _log_run(data_dir, model_dir, eval_dir, card, metrics, params, tags, new_run=not run_id)
        progress.update(1)
        base_path, info = _log_model(model_dir, cfg.model_name, test["text"].head(3).tolist(), task)
        version = str(info.registered_model_version)
        progress.update(1)
        client = mlflow.MlflowClient()
        version_tags = {**tags, f"kftune.test_{primary}": f"{metrics['model'][primary]:.4f}",
                        "kftune.run_id": run.info.run_id}
        if base_path:  # what registry.load_components checks the base against
            from kftune.lora import weights_digest

            version_tags.update({registry.LORA_BASE: base_path, registry.LORA_BASE_SHA256: weights_digest(base_path)})
        if hist:
            version_tags[f"kftune.historical_{primary}"] = f"{hist[primary]:.4f}"
        for k, v in version_tags.items():
            client.set_model_version_tag(cfg.model_name, version, k, v)
        # retraining pins the champion in resolve (drift and warm start used it; "" for none); promote refuses if
        # it moved
        champion = card["champion_version"] if "champion_version" in card else \
            registry.version_by_alias(cfg.model_name, registry.CHAMPION)
        verdict = gate.Verdict(gate.HOLD, version, primary, metrics["model"][primary],
                               metrics["baselines"][metrics["baseline"]][primary], champion or "",
                               challenger_historical_score=hist[primary] if hist else None)
        gate.judge(verdict, params, tests, metrics["labels"], task, trained)
        progress.update(1)
        mlflow.log_metrics({f"champion_{k}_{primary}": v for k, v in {
            "test": verdict.champion_score, "historical_test": verdict.champion_historical_score}.items()
            if v is not None})
        gate.record(cfg.model_name, verdict, metrics["baseline"])
        card_text = publish(cfg.model_name, version, run.info.run_id, params.model.name, card, metrics, verdict,
                            git_commit)
        mlflow.log_text(card_text, "model_card.md")
        if verdict.decision != gate.HOLD:  # what `serve.precision=auto` will serve, measured once, not per start;
            # a held version is not served (promoted by hand, the server measures it at load)
            from kftune.steps.resolve import reference_rows

            measure_at_registration(cfg.model_name, version, model_dir, reference_rows(data_dir), task, params.serve)
        mlflow.set_tags({"kftune.decision": verdict.decision, "kftune.status": "finished"})
        mlflow.log_dict(verdict.to_dict(), "decision.json")
    progress.update(1)
    if retrain_run := card.get("lineage", {}).get("retrain_run_id"):  # the retraining run that asked for this
        for k, v in {"challenger_version": version, "decision": verdict.decision}.items():
            client.set_tag(retrain_run, f"kftune.{k}", v)
        finish_run(retrain_run)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # the retraining run's id: promote records a refusal there
    write_json(Path(out_dir) / "decision.json", {**verdict.to_dict(), "retrain_run_id": retrain_run or ""})
    log.info("register: v%s %s (%s)", version, verdict.decision, "; ".join(verdict.reasons))
    return verdict
