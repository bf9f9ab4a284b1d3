"""Kubeflow Pipelines on a cluster: compile, submit, recurring runs."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

from kftune.config import WEBHOOK_ENV, ConfigError, KftuneError, Params

PIPELINES = ("training", "retraining", "monitoring", "batch-predict")
DEFAULT_IMAGE = "kftune:0.1.0"
log = logging.getLogger(__name__)


class ClusterError(KftuneError):
    pass


def image() -> str:
    """The component image: KFTUNE_IMAGE (your registry's tag), else the name `make image` builds."""
    return os.environ.get("KFTUNE_IMAGE") or DEFAULT_IMAGE


def pipeline_factory(which: str):
    if which not in PIPELINES:
        raise ConfigError(f"pipeline {which!r}: choose one of {', '.join(PIPELINES)}")
    from pipelines import batch_predict, monitoring, retraining, training

    return {"training": training, "retraining": retraining, "monitoring": monitoring,
            "batch-predict": batch_predict}[which].create_pipeline


def compile_pipeline(params: Params, out: str | Path, which: str = "training", image_tag: str = "") -> Path:
    """Write the cluster flavour of a pipeline as KFP IR YAML, every task on `image_tag` (default: image())."""
    from kfp import compiler

    if not Path(out).resolve().parent.is_dir():
        raise ClusterError(f"{out}: the folder {Path(out).resolve().parent} does not exist")
    if Path(out).suffix not in (".yaml", ".yml"):  # KFP: .json is deprecated and cannot hold the Kubernetes parts
        raise ClusterError(f"{out}: a compiled pipeline is KFP IR YAML; name the file .yaml or .yml")
    defaults = params.to_dict()
    secret = params.cluster.webhook_secret
    if params.monitor.webhook_url and which == "monitoring":
        log.warning("monitor.webhook_url is not compiled into the pipeline: the monitoring task reads it as %s from "
                    "the Secret %s (kubectl create secret generic %s --from-literal=%s=URL)", WEBHOOK_ENV, secret,
                    secret, WEBHOOK_ENV)
    defaults["monitor"]["webhook_url"] = ""  # a credential stays out of every compiled file (config.SECRET_PARAMS)
    pipeline = pipeline_factory(which)(defaults, image=image_tag or image(), cluster=True)
    compiler.Compiler().compile(pipeline, str(out))
    return Path(out)


def pipeline_arguments(package: str | Path, arguments: dict, git_commit: str = "") -> dict:
    """`arguments` checked against the compiled pipeline's inputs and typed as they are (KFP refuses "1" for a
    number), plus git_commit where the pipeline takes it. One clear error for an unknown name, a value of the
    wrong type, a required input left out, or a request log or input file on this machine's disk."""
    import yaml

    spec = next(yaml.safe_load_all(Path(package).read_text()))
    name, inputs = spec["pipelineInfo"]["name"], spec["root"].get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(arguments) - set(inputs))
    if unknown:
        raise ClusterError(f"{name} has no input {', '.join(unknown)} (its inputs: {', '.join(sorted(inputs))})")
    out = {**({"git_commit": git_commit} if "git_commit" in inputs and git_commit else {}),
           **{k: _typed(name, k, v, inputs[k]["parameterType"]) for k, v in arguments.items()}}
    missing = [k for k, d in sorted(inputs.items()) if k not in out and "defaultValue" not in d and not d.get("isOptional")]
    if missing:
        raise ClusterError(f"{name} needs {' '.join(f'-p {k}=...' for k in missing)}")
    hints = {"log_dir": "where the InferenceService writes its request log: -S serve.log_dir=s3://...",
             "input_path": "-p input_path=s3://..."}
    given = lambda key: str(out.get(key, inputs.get(key, {}).get("defaultValue", "")))  # noqa: E731
    for key, hint in hints.items():  # read by a pod: a path on this machine means nothing there
        if key in inputs and given(key) and "://" not in given(key):
            raise ClusterError(f"{name}: {key}={given(key)!r} is a path on this machine; a pod reads an s3:// prefix, "
                               f"{hint}")
    if "data_path" in inputs and "://" not in given("data_path") and "://" not in given("data_repo"):
        raise ClusterError(f"{name}: data_path={given('data_path')!r} is a path on this machine and no -p data_repo "
                           f"names a git repo to read it from (through DVC); a pod needs -p data_path=s3://... or "
                           f"-p data_repo=https://.../repo.git")
    return out


def _typed(pipeline: str, key: str, value, kind: str):
    """A -p value as the input's KFP type."""
    if not isinstance(value, str) or kind == "STRING":
        return value
    try:
        if kind == "NUMBER_INTEGER":
            return int(value)
        if kind == "NUMBER_DOUBLE":
            return float(value)
        if kind == "BOOLEAN":
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.strip().lower()]
        if kind in ("STRUCT", "LIST"):
            import json

            return json.loads(value)
    except (ValueError, KeyError):
        raise ClusterError(f"-p {key}={value}: {pipeline}'s input {key} is of type {kind}") from None
    return value


@contextlib.contextmanager
def _api(host: str, action: str):
    """KFP's API errors (404 for an unknown id, 403, ...) as one line naming the host and what was asked."""
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        raise ClusterError(f"{action} on {host}: HTTP {exc.status} {exc.reason}: "
                           f"{str(exc.body or '')[:300]}") from None


def kfp_client(host: str):
    """A KFP API client; auth from a bearer token in KFTUNE_KFP_TOKEN, if set."""
    import kfp

    try:
        return kfp.Client(host=host, existing_token=os.environ.get("KFTUNE_KFP_TOKEN") or None)
    except Exception as exc:  # kfp checks /healthz on construction; urllib3 raises its own errors
        raise ClusterError(f"cannot reach Kubeflow Pipelines at {host}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:300]}") from None


def submit(host: str, params: Params, arguments: dict[str, str], experiment: str = "kftune",
           which: str = "training", image_tag: str = "") -> str:
    """Compile a cluster pipeline and start a run on a KFP endpoint (the experiment is created if
    needed); return the run's URL."""
    from kftune.tracking import git_commit

    client = kfp_client(host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(params, Path(tmp) / "pipeline.yaml", which, image_tag)
        arguments = pipeline_arguments(package, arguments, git_commit())
        with _api(host, f"starting a {which} run"):
            run = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, experiment_name=experiment,
                run_name=f"kftune-{which}-{params.register.model_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return f"{host.rstrip('/')}/#/runs/details/{run.run_id}"


def kfp_cron(cron: str) -> str:
    """KFP's recurring runs take a 6-field cron with seconds first."""
    from kftune.schedule import check_cron

    return f"0 {check_cron(cron)}"


def schedule_on_cluster(host: str, params: Params, runs: list[tuple[str, str, dict]], experiment: str = "kftune",
                        image_tag: str = "") -> list[str]:
    """Create a KFP recurring run per (pipeline, cron, arguments) in `runs` (retraining, monitoring):
    max_concurrency=1, no catch-up. All are checked (no run of that name yet, arguments valid) before any is
    created. Returns their ids."""
    client = kfp_client(host)
    names = [f"kftune-{which}-{params.register.model_name}" for which, _, _ in runs]
    for existing in (r for r in manage_on_cluster(host, "list") if r["name"] in names):
        # two would overlap: two challengers per fire time, or each alert sent twice
        raise ClusterError(f"{host} already has the recurring run {existing['name']} (id {existing['id']}, "
                           f"{existing['status']}); `kftune schedule delete {existing['id']} --host {host}` "
                           f"first to replace it")
    with tempfile.TemporaryDirectory() as tmp:
        packages = [compile_pipeline(params, Path(tmp) / f"{which}.yaml", which, image_tag) for which, _, _ in runs]
        arguments = [pipeline_arguments(p, a) for p, (_, _, a) in zip(packages, runs)]
        with _api(host, f"creating the experiment {experiment}"):
            exp = client.create_experiment(experiment)  # returns the existing one if there is one
        created = []
        for name, (_, cron, _), package, args in zip(names, runs, packages, arguments):
            done = "".join(f" ({n}, id {i}, was created already)" for n, i in zip(names, created))
            with _api(host, f"creating the recurring run {name}{done}"):
                created.append(client.create_recurring_run(
                    experiment_id=exp.experiment_id, job_name=name, cron_expression=kfp_cron(cron),
                    max_concurrency=1, no_catchup=True, params=args,
                    pipeline_package_path=str(package)).recurring_run_id)
        return created


def manage_on_cluster(host: str, action: str, recurring_run_id: str = "") -> list[dict]:
    """list | pause | resume | delete KFP recurring runs."""
    client = kfp_client(host)
    if action == "list":
        runs, token = [], ""
        with _api(host, "listing recurring runs"):
            while True:  # every page: a run missed on a later one would be scheduled twice
                page = client.list_recurring_runs(page_token=token, page_size=100)
                runs += page.recurring_runs or []
                token = page.next_page_token
                if not token:
                    break
        return [{"id": r.recurring_run_id, "name": r.display_name, "status": r.status,
                 "cron": r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else ""} for r in runs]
    if not recurring_run_id:
        raise ClusterError(f"schedule {action} needs the recurring run's id (see `kftune schedule list --host ...`)")
    with _api(host, f"schedule {action} {recurring_run_id}"):
        {"pause": client.disable_recurring_run, "resume": client.enable_recurring_run,
         "delete": client.delete_recurring_run}[action](recurring_run_id)
    return [{"id": recurring_run_id, "action": action}]
