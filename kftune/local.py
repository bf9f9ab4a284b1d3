"""Local runs: a pre-flight check in-process, then a pipeline through kfp.local in this environment."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from kftune.config import WEBHOOK_ENV, ConfigError, KftuneError, Params
from kftune.fileio import read_json, single_instance

log = logging.getLogger(__name__)


class PipelineFailed(KftuneError):
    """A pipeline step failed; the message names the step and its root cause, the log file has the rest."""


def preflight(data_path: str, params: Params, data_repo: str = "", data_rev: str = "") -> dict:
    """Everything that can fail on bad input, checked in-process before any pipeline step starts.

    Returns the data card the ingest step will produce.
    """
    from kftune.data import materialize
    from kftune.steps.ingest import ingest

    layers = _base_model_config(params.model.name).get("num_hidden_layers")
    if layers is not None and params.finetune.freeze_layers > layers:
        raise ConfigError(f"finetune.freeze_layers={params.finetune.freeze_layers}: {params.model.name} has only "
                          f"{layers} layers")
    with tempfile.TemporaryDirectory() as tmp:
        local, lineage = materialize(data_path, data_repo, data_rev, tmp)
        card = ingest(local, Path(tmp) / "data", params.ingest, lineage, params.task)
    if params.register.golden_test:
        from kftune.splits import check_golden, read_golden

        golden = params.register.golden_test
        check_golden(read_golden(golden, params.ingest, params.task), card["labels"], golden)
    return card


def _base_model_config(name: str) -> dict:
    """The base model's config.json: read as a file where it is a folder (importing transformers and torch
    for it costs seconds), through transformers for a hub id."""
    from kftune.base_models import load_pretrained, resolve_base_model

    found = resolve_base_model(name)
    if (Path(found) / "config.json").is_file():
        return read_json(Path(found) / "config.json")
    from transformers import AutoConfig

    return load_pretrained(AutoConfig, found).to_dict()


def _data_location(data_path: str, project_dir: Path, data_repo: str, data_rev: str) -> tuple[str, str]:
    """(data_path, data_repo) as the pipeline needs them: a revision reads the project's own git history."""
    if data_rev and not data_repo:
        return data_path, str(project_dir)
    if not data_repo and not str(data_path).startswith("s3://"):
        return str(Path(data_path).resolve()), data_repo
    if data_repo and Path(data_repo).is_dir():  # a local repo: tasks (containers too) run in other folders
        return data_path, str(Path(data_repo).resolve())
    return data_path, data_repo


def run_pipeline(which: str, params: Params, project_dir: Path, verbose: bool = False, runner: str = "subprocess",
                 image: str = "", **arguments):
    """Run one pipeline with kfp.local (SubprocessRunner, this Python environment); return (task, report).

    The terminal gets one line per step; kfp.local's full output goes to
    <project_dir>/local_outputs/<pipeline>-<time>.log. report: per-step wall time and status.
    """
    from kfp import local

    from kftune.cluster import pipeline_factory
    from kftune.console import StepConsole
    from kftune.tracking import close_runs, configure, git_commit, owner_where

    configure(project_dir)
    # every step's MLflow run names this command as its owner (containers too: kftune.containers passes it)
    os.environ["KFTUNE_OWNER_PID"] = str(os.getpid())
    os.environ["KFTUNE_OWNER_WHERE"] = owner_where()
    doc = params.to_dict()
    if doc["monitor"]["webhook_url"]:  # a credential: to the tasks by the environment, as a cluster Secret does;
        os.environ[WEBHOOK_ENV] = doc["monitor"]["webhook_url"]  # as a parameter kfp.local would log it
        doc["monitor"]["webhook_url"] = ""
    outputs = project_dir / "local_outputs"
    run_id = f"{which}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # Ctrl-C stops this run's containers only
    if runner == "docker":  # every task in the component image (kftune.containers), against a tracking server
        from kftune.cluster import image as default_image
        from kftune.containers import docker_runner

        image = image or default_image()
        arguments.setdefault("checkpoint_root", str(project_dir / ".kftune" / "checkpoints"))
        task_runner = docker_runner(image, outputs, project_dir, arguments, run_id)
    else:
        task_runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=task_runner, pipeline_root=str(outputs), raise_on_error=True)
    console = StepConsole(outputs / f"{which}-{time.strftime('%Y%m%d-%H%M%S')}.log", sys.stdout, verbose)
    print(f"{which} pipeline (full log: {console.log_path})", flush=True)
    arguments.update(checkpoint_root=str(project_dir / ".kftune" / "checkpoints"), git_commit=git_commit(project_dir))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(console):
            warnings.filterwarnings("ignore", message=".*(no effect in the current local runner|non-Python base image)")
            task = pipeline_factory(which)(doc, **({"image": image} if image else {}))(**arguments)
    except RuntimeError as exc:
        cause = f"step {console.failed_step() or '?'} failed: {console.root_cause() or exc}"
        close_runs("FAILED", cause)
        raise PipelineFailed(f"{cause}\n(full log: {console.log_path})") from None
    except Exception as exc:  # the runner's own error (the Docker engine, kfp): the runs end all the same
        close_runs("FAILED", f"step {console.failed_step() or '?'}: {type(exc).__name__}: {exc}")
        raise
    except KeyboardInterrupt as exc:
        with signals_held():  # a second Ctrl-C during the seconds of waiting must not skip closing the runs
            stop_children()
            if runner == "docker":
                from kftune.containers import stop_containers

                with contextlib.suppress(Exception):  # the engine gone too: close the runs all the same
                    stop_containers(run_id)
        close_runs("KILLED", f"interrupted ({exc or 'SIGINT'}) during step {console.failed_step() or '?'}")
        raise
    finally:
        console.close()
    return task, {"steps": console.steps, "log": str(console.log_path)}


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM ignored while the block runs (in the main thread; elsewhere signals never arrive)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_children(grace: float = 3.0) -> None:
    """Terminate the pipeline steps this process started (kfp.local waits for them otherwise), then kill
    what is still there after `grace` seconds."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def check_dependencies(project_dir: Path, params: Params, data_path: str = "") -> None:
    """In seconds, before any step: the tracking store and any S3 bucket in use (the data's, the artifact
    root's) answer, runs left by dead commands are closed, and the disk has room for what the run writes
    (the model about 3x: checkpoint, output, registry copy)."""
    import shutil

    from kftune.base_models import resolve_base_model
    from kftune.registry import reconcile
    from kftune.tracking import check_reachable, check_s3, configure, sweep_dead_runs

    check_reachable(configure(project_dir))
    for url in {str(data_path), os.environ.get("KFTUNE_ARTIFACT_ROOT", "")}:
        if url.startswith("s3://"):
            check_s3(url)
    sweep_dead_runs()
    reconcile(params.register.model_name)
    base = Path(resolve_base_model(params.model.name))
    model_bytes = sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) if base.is_dir() else 0
    need, free = 3 * model_bytes + 200 * 2**20, shutil.disk_usage(project_dir).free
    if free < need:
        raise KftuneError(f"{project_dir}: {free / 2**20:.0f} MiB free, the run needs about {need / 2**20:.0f} MiB "
                          f"(model {model_bytes / 2**20:.0f} MiB x 3 + 200 MiB); free some space")


def _training_seconds(run_dir: Path) -> float:
    summary = next(iter(run_dir.glob("finetune-op/model/train_summary.json")), None)
    return read_json(summary)["train_seconds"] if summary else 0.0


def breakdown(report: dict) -> str:
    """Per step: wall time, and how much of it was training; the share of the run outside training."""
    rows = [(s["step"], s["seconds"], s["status"]) for s in report["steps"]]
    total = sum(r[1] for r in rows)
    train = report.get("train_seconds", 0.0)
    lines = [f"  {'step':<12}{'wall s':>8}  status"]
    lines += [f"  {name:<12}{sec:>8.1f}  {status}" + (f" (training {train:.1f} s)" if name == "fine-tune" else "")
              for name, sec, status in rows]
    if total:
        lines.append(f"  {'total':<12}{total:>8.1f}  outside training {total - train:.1f} s "
                     f"({(total - train) / total:.0%})")
    return "\n".join(lines)


def run_local(data_path: str, params: Params, project_dir: str | Path = ".", data_repo: str = "",
              data_rev: str = "", verbose: bool = False, runner: str = "subprocess", image: str = "") -> dict:
    """Run the training pipeline locally; return the gate's decision (with the step timings as `report`).

    Outputs land in <project_dir>/local_outputs, MLflow in <project_dir>/mlflow.db + mlartifacts
    unless MLFLOW_TRACKING_URI is set, checkpoints in <project_dir>/.kftune/checkpoints.
    """
    project_dir = Path(project_dir).resolve()
    data_path, data_repo = _data_location(data_path, project_dir, data_repo, data_rev)
    t0 = time.monotonic()
    check_dependencies(project_dir, params, data_path)
    card = preflight(data_path, params, data_repo, data_rev)
    pre = {"step": "pre-flight", "status": "ok", "seconds": time.monotonic() - t0, "summary": ""}
    task, report = run_pipeline("training", params, project_dir, verbose, runner, image, data_path=data_path,
                                data_repo=data_repo, data_rev=data_rev, data_hash=card["sha256"])
    report["steps"].insert(0, pre)
    report["run_dir"] = str(Path(task.output.path).parents[1])
    report["train_seconds"] = _training_seconds(Path(report["run_dir"]))
    return {**read_json(Path(task.output.path) / "decision.json"), "report": report}


def run_retraining_local(params: Params, project_dir: str | Path = ".", data_path: str = "", data_repo: str = "",
                         data_rev: str = "", force: bool = False, verbose: bool = False, runner: str = "subprocess",
                         image: str = "") -> dict:
    """Run the retraining pipeline locally; return what it decided (see `retraining_outcome`).

    Without data_path it reads the project's versioned dataset (kftune.data.DATASET) through DVC.
    One retraining at a time per project: a second one (manual or scheduled) refuses to start.
    """
    from kftune.data import DATASET

    project_dir = Path(project_dir).resolve()
    with single_instance(project_dir / ".kftune" / "retrain.lock", "retraining run"):
        if not data_path:
            data_path, data_repo = DATASET, data_repo or str(project_dir)
        data_path, data_repo = _data_location(data_path, project_dir, data_repo, data_rev)
        check_dependencies(project_dir, params, data_path)
        preflight(data_path, params, data_repo, data_rev)
        task, report = run_pipeline("retraining", params, project_dir, verbose, runner, image, data_path=data_path,
                                    data_repo=data_repo, data_rev=data_rev, force=force)
        card = read_json(Path(task.output.path) / "data_card.json")
        return {**retraining_outcome(card, params.register.model_name), "report": report}


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
