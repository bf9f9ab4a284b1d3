"""Thin runners for the training pipeline: kfp.local here, IR YAML for a cluster."""

from __future__ import annotations

import logging
import re
import time
import tempfile
from pathlib import Path

from kftune.config import ConfigError, Params
from kftune.fileio import read_json

log = logging.getLogger(__name__)


class PipelineFailed(RuntimeError):
    """A pipeline step failed; its own log (printed above) has the details."""


def preflight(data_path: str, params: Params, data_repo: str = "", data_rev: str = "") -> dict:
    """Everything that can fail on bad input, checked in-process before any pipeline step starts.

    Returns the data card the ingest step will produce.
    """
    from transformers import AutoConfig

    from kftune.data import materialize
    from kftune.models import load_pretrained, resolve_base_model
    from kftune.steps.ingest import ingest

    config = load_pretrained(AutoConfig, resolve_base_model(params.model.name))
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and params.finetune.freeze_layers > layers:
        raise ConfigError(f"finetune.freeze_layers={params.finetune.freeze_layers}: {params.model.name} has only "
                          f"{layers} layers")
    with tempfile.TemporaryDirectory() as tmp:
        local, lineage = materialize(data_path, data_repo, data_rev, tmp)
        return ingest(local, Path(tmp) / "data", params.ingest, lineage, params.task)


PIPELINES = ("training", "retraining")


def pipeline_factory(which: str):
    if which not in PIPELINES:
        raise ConfigError(f"pipeline {which!r}: choose one of {', '.join(PIPELINES)}")
    from pipelines import retraining, training

    return {"training": training, "retraining": retraining}[which].create_pipeline


def compile_pipeline(params: Params, out: str | Path, which: str = "training") -> Path:
    """Write the cluster flavour of a pipeline as KFP IR YAML (image from KFTUNE_IMAGE)."""
    from kfp import compiler

    compiler.Compiler().compile(pipeline_factory(which)(params.to_dict(), cluster=True), str(out))
    return Path(out)


def _local(project_dir: Path):
    from kfp import local

    from kftune.tracking import configure

    configure(project_dir)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(project_dir / "local_outputs"),
               raise_on_error=True)


def _run(pipeline, **arguments):
    try:
        return pipeline(**arguments)
    except RuntimeError as exc:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # kfp colours its messages
        raise PipelineFailed(f"{plain} The failing step's log is printed above.") from None


def _data_location(data_path: str, project_dir: Path, data_repo: str, data_rev: str) -> tuple[str, str]:
    """(data_path, data_repo) as the pipeline needs them: a revision reads the project's own git history."""
    if data_rev and not data_repo:
        return data_path, str(project_dir)
    if not data_repo and not str(data_path).startswith("s3://"):
        return str(Path(data_path).resolve()), data_repo
    return data_path, data_repo


def run_local(data_path: str, params: Params, project_dir: str | Path = ".", data_repo: str = "",
              data_rev: str = "") -> dict:
    """Run the training pipeline with kfp.local in this Python environment; return the gate's decision.

    Outputs land in <project_dir>/local_outputs, MLflow in <project_dir>/mlflow.db + mlartifacts
    unless MLFLOW_TRACKING_URI is set, checkpoints in <project_dir>/.kftune/checkpoints.
    """
    from kftune.tracking import git_commit
    from pipelines.training import create_pipeline

    project_dir = Path(project_dir).resolve()
    data_path, data_repo = _data_location(data_path, project_dir, data_repo, data_rev)
    card = preflight(data_path, params, data_repo, data_rev)
    _local(project_dir)
    task = _run(create_pipeline(params.to_dict()), data_path=data_path, data_repo=data_repo, data_rev=data_rev,
                data_hash=card["sha256"], checkpoint_root=str(project_dir / ".kftune" / "checkpoints"),
                git_commit=git_commit(project_dir))
    return read_json(Path(task.output.path) / "decision.json")


def run_retraining_local(params: Params, project_dir: str | Path = ".", data_path: str = "", data_repo: str = "",
                         data_rev: str = "", force: bool = False) -> dict:
    """Run the retraining pipeline with kfp.local; return what it decided (see `retraining_outcome`).

    Without data_path it reads the project's versioned dataset (kftune.data.DATASET) through DVC.
    One retraining at a time per project: a second one (manual or scheduled) refuses to start.
    """
    from kftune.schedule import single_instance

    if params.task != "sequence-classification":
        raise ConfigError(f"task={params.task!r}: the retraining pipeline (drift tests, replay) is built for "
                          f"sequence-classification; retrain a {params.task} model with `kftune run`")
    with single_instance(Path(project_dir) / ".kftune" / "retrain.lock", "retraining run"):
        return _retrain(params, Path(project_dir).resolve(), data_path, data_repo, data_rev, force)


def _retrain(params: Params, project_dir: Path, data_path: str, data_repo: str, data_rev: str, force: bool) -> dict:
    from kftune.data import DATASET
    from kftune.tracking import git_commit
    from pipelines.retraining import create_pipeline

    if not data_path:
        data_path, data_repo = DATASET, data_repo or str(project_dir)
    data_path, data_repo = _data_location(data_path, project_dir, data_repo, data_rev)
    preflight(data_path, params, data_repo, data_rev)
    _local(project_dir)
    task = _run(create_pipeline(params.to_dict()), data_path=data_path, data_repo=data_repo, data_rev=data_rev,
                force=force, checkpoint_root=str(project_dir / ".kftune" / "checkpoints"),
                git_commit=git_commit(project_dir))
    return retraining_outcome(read_json(Path(task.output.path) / "data_card.json"), params.register.model_name)


def retraining_outcome(card: dict, model_name: str) -> dict:
    """One retraining run's record, read back from its MLflow run and the registry."""
    import mlflow

    from kftune import registry

    run = mlflow.MlflowClient().get_run(card["lineage"]["retrain_run_id"])
    t = {k.removeprefix("kftune."): v for k, v in run.data.tags.items() if k.startswith("kftune.")}
    return {"run_id": run.info.run_id, "status": card["status"], "new_rows": card["new_rows"],
            "drift": t.get("drift", ""), "retrain": t.get("retrain_decision", "skip"),
            "reason": t.get("retrain_reason", "nothing new since the champion's data"),
            "challenger_version": t.get("challenger_version", ""), "decision": t.get("decision", ""),
            "champion": registry.version_by_alias(model_name, registry.CHAMPION) or "",
            "drift_scores": {k.removeprefix("drift_"): v for k, v in run.data.metrics.items() if k.startswith("drift_")}}


def describe_outcome(o: dict) -> str:
    """One retraining run in one line, as the CLI, the scheduler's log and the demo show it."""
    challenger = f", challenger v{o['challenger_version']} {o['decision']}" if o["challenger_version"] else ""
    return (f"{o['status']} ({o['new_rows']} new rows), drift {o['drift'] or '-'}, {o['retrain']}: {o['reason']}"
            f"{challenger}; champion v{o['champion'] or '-'}")


def kfp_client(host: str):
    """A KFP API client; auth from a bearer token in KFTUNE_KFP_TOKEN, if set."""
    import os

    import kfp

    try:
        return kfp.Client(host=host, existing_token=os.environ.get("KFTUNE_KFP_TOKEN") or None)
    except Exception as exc:  # kfp checks /healthz on construction; urllib3 raises its own errors
        raise PipelineFailed(f"cannot reach Kubeflow Pipelines at {host}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300]}") from None


def submit(host: str, params: Params, arguments: dict[str, str], experiment: str = "kftune",
           which: str = "training") -> str:
    """Compile a cluster pipeline and start a run on a KFP endpoint; return the run's URL.

    The experiment is created if needed.
    """
    from kftune.tracking import git_commit

    client = kfp_client(host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(params, Path(tmp) / "pipeline.yaml", which)
        run = client.create_run_from_pipeline_package(
            str(package), arguments={"git_commit": git_commit(), **arguments}, experiment_name=experiment,
            run_name=f"kftune-{which}-{params.register.model_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return f"{host.rstrip('/')}/#/runs/details/{run.run_id}"


def torchrun_finetune(tokenized_dir: str, out_dir: str, params: Params, processes: int, run_id: str = "",
                      checkpoint_dir: str | None = None, start_model: str = "") -> None:
    """Run the fine-tune step under torchrun: one process per GPU (gloo workers on a CPU-only host).

    start_model: weights to start from instead of model.name (a warm start from the champion).
    """
    import subprocess
    import sys

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        settings = Path(tmp) / "params.yaml"
        values = params.to_dict()
        values["model"]["name"] = start_model or values["model"]["name"]
        settings.write_text(yaml.safe_dump(values), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "kftune.cli", "step", "finetune", "--data", str(tokenized_dir), "--out", str(out_dir),
               "--params", str(settings)]
        cmd += ["--mlflow-run-id", run_id] if run_id else []
        cmd += ["--checkpoint-dir", checkpoint_dir] if checkpoint_dir else []
        if subprocess.run(cmd).returncode:
            raise PipelineFailed(f"distributed fine-tune ({processes} processes) failed; see its log above")
