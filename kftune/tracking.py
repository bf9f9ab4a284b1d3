"""MLflow setup: an embedded sqlite store by default, any tracking server via MLFLOW_TRACKING_URI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEFAULT_DB = "mlflow.db"


def configure(project_dir: str | Path | None = None) -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, else sqlite:///<project_dir>/mlflow.db; return the URI.

    The URI is exported so that pipeline steps running in subprocesses use the same store.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path(project_dir or os.getcwd()).resolve() / DEFAULT_DB}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """Get or create an experiment.

    New experiments keep artifacts under KFTUNE_ARTIFACT_ROOT (e.g. s3://bucket/mlflow, with
    MLFLOW_S3_ENDPOINT_URL for MinIO) when set; else, with a local sqlite store, in ./mlartifacts
    beside the database; else wherever the tracking server puts them.
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if os.environ.get("KFTUNE_ARTIFACT_ROOT"):
        location = f"{os.environ['KFTUNE_ARTIFACT_ROOT'].rstrip('/')}/{name}"
    elif uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another step
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit of the code that runs, with '-dirty' if the tree has changes; 'unknown' outside git."""
    if os.environ.get("KFTUNE_GIT_COMMIT"):  # set at image build / submit time on a cluster
        return os.environ["KFTUNE_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty else "")


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def start_run(params, run_name: str = "") -> str:
    """Create the MLflow run that one pipeline run logs into, with every setting as a param."""
    import mlflow

    configure()
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id(params.register.experiment), run_name=run_name or None,
                            tags={"kftune.params_hash": params.digest(), "kftune.model": params.model.name})
    items = [mlflow.entities.Param(k, str(v)) for k, v in flatten(params.to_dict()).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id
