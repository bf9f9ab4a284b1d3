"""MLflow setup: an embedded sqlite store by default, any tracking server via MLFLOW_TRACKING_URI."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

DEFAULT_DB = "mlflow.db"
TASK_ID = "kftune.kfp_task_id"  # a pipeline task's id, the same for each of its attempts (tracking.task_attempt)
# The MLflow 3 UI opens an experiment by its kind: without this tag it guesses, and an experiment with
# few runs opens on the GenAI overview (traces) instead of the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
        if "mlflow.experimentKind" not in exp.tags:  # made before kftune tagged its experiments
            for k, v in EXPERIMENT_KIND.items():
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    location = None
    if os.environ.get("KFTUNE_ARTIFACT_ROOT"):
        location = f"{os.environ['KFTUNE_ARTIFACT_ROOT'].rstrip('/')}/{name}"
    elif uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
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


def key_part(text) -> str:
    """A label or a rule name as part of an MLflow metric or tag key (or an artifact file name): characters MLflow
    refuses, and "/" (a path), become "_", and a short hash of the original is added when anything changed, so
    `c++` and `c--` never share a key."""
    import hashlib
    import re

    text = str(text)
    key = re.sub(r"[^\w\-. :]", "_", text)[:200]
    return key if key == text else f"{key}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def redacted(doc: dict) -> dict:
    """A params document fit to log: every SECRET_PARAMS value reduced to where it points (redact_url)."""
    from kftune.config import SECRET_PARAMS

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    for key in SECRET_PARAMS:
        section, name = key.split(".")
        if out.get(section, {}).get(name):
            out[section][name] = redact_url(str(out[section][name]))
    return out


def redact_url(url: str) -> str:
    """scheme://host/... of a URL: where it points, without the token its path or query carries."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return url
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}" + \
        ("/..." if parts.path.strip("/") or parts.query else "")


def start_run(params, run_name: str = "", task_id: str = "") -> str:
    """Create the MLflow run that one pipeline run logs into, with every setting as a param (task_id: see
    task_attempt)."""
    import mlflow

    configure()
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id(params.register.experiment), run_name=run_name or None,
                            tags={"kftune.params_hash": params.digest(), "kftune.model": params.model.name,
                                  **owner_tags(), **task_attempt(client, task_id)})
    items = [mlflow.entities.Param(k, str(v)) for k, v in flatten(redacted(params.to_dict())).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


# --- every run ends ---------------------------------------------------------------------------

def owner() -> str:
    """host:pid of the kftune command a run belongs to (pipeline steps inherit KFTUNE_OWNER_PID)."""
    import socket

    return f"{socket.gethostname()}:{os.environ.get('KFTUNE_OWNER_PID') or os.getpid()}"


def owner_where() -> str:
    """The owner's pid namespace and boot (KFTUNE_OWNER_WHERE in its pipeline steps, containers included): a pid
    means that process only there. A container on the host network shares the host's name, not its pids."""
    from kftune.processes import where

    if os.environ.get("KFTUNE_OWNER_WHERE"):
        return os.environ["KFTUNE_OWNER_WHERE"]
    here = where()
    return f"{here['pid_namespace']}.{here['boot']}"


def owner_tags() -> dict[str, str]:
    return {"kftune.owner": owner(), "kftune.owner_where": owner_where()}


def task_attempt(client, task_id: str) -> dict[str, str]:
    """The tag that names a run's pipeline task (`dsl.PIPELINE_TASK_ID_PLACEHOLDER`, the same for every attempt
    of one task), after closing as KILLED the runs an earlier attempt of it left RUNNING: a cluster retries a
    task whose pod was evicted or OOM-killed, and that pod cannot end its run (local runs of killed commands
    are swept by owner pid instead). No task id, or one KFP did not fill in: nothing."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", task_id or ""):
        return {}
    close_running(client, TASK_ID, task_id, "an earlier attempt of this pipeline task (owner {owner}) did not "
                                            "finish; retried")
    return {TASK_ID: task_id}


def close_running(client, tag: str, value: str, cause: str) -> list[str]:
    """Close as KILLED every RUNNING run tagged `tag` = `value` (letters, digits and '-' only), when the caller
    knows no live process can own one (a retried task; a check holding its log's lock). `cause` may name the
    run's {owner}. Returns the run ids."""
    if not re.fullmatch(r"[A-Za-z0-9-]+", value):
        raise ValueError(f"{tag}={value!r}: a tag value to search by must be letters, digits and '-'")
    runs = client.search_runs(_kftune_experiments(client), f"tags.`{tag}` = '{value}' and "
                                                           f"attributes.status = 'RUNNING'", max_results=100)
    return [_close(client, r.info.run_id, "KILLED", cause.format(owner=r.data.tags.get("kftune.owner", "?")))
            for r in runs]


def _alive(run_owner: str, where: str = "") -> bool:
    import socket

    host, _, pid = run_owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or where and where != owner_where():
        return True  # another machine's run, or another pid namespace's: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _kftune_experiments(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments() if not e.name.startswith("kftune-history-")]


def finish_run(run_id: str) -> None:
    """A run whose work is done: kftune.status finished, status FINISHED."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(run_id, "kftune.status", "finished")
    client.set_terminated(run_id, "FINISHED")


def fail_run(run_id: str, cause: str) -> None:
    """A run whose step failed: FAILED, with the cause (a retried step opens a run of its own)."""
    import mlflow

    _close(mlflow.MlflowClient(), run_id, "FAILED", cause)


def close_runs(status: str, cause: str, run_owner: str | None = None) -> list[str]:
    """End every unfinished run of `run_owner` (default: this command) as FAILED or KILLED, with kftune.status
    and the root cause; remove the model versions such a run registered but never decided on. Returns run ids."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs(_kftune_experiments(client), f"tags.`kftune.owner` = '{run_owner or owner()}'",
                              max_results=1000)
    return [_close(client, r.info.run_id, status, cause) for r in runs if "kftune.status" not in r.data.tags]


def _close(client, run_id: str, status: str, cause: str) -> str:
    client.set_tag(run_id, "kftune.status", status.lower())
    client.set_tag(run_id, "kftune.failure", cause[:5000])
    for mv in client.search_model_versions(f"run_id = '{run_id}'"):
        if "kftune.decision" not in mv.tags:  # registered, then the step died before the gate: not a real version
            client.delete_model_version(mv.name, mv.version)
    _remove_unfinished_models(client, run_id)
    client.set_terminated(run_id, status)
    return run_id


def _remove_unfinished_models(client, run_id: str) -> None:
    """A logged model whose upload never finished (PENDING, FAILED: a full disk, a kill) goes, with the partial
    files it left in the artifact store."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    experiment = client.get_run(run_id).info.experiment_id
    for model in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
        if str(model.status).rsplit(".", 1)[-1] != "READY":
            try:
                get_artifact_repository(model.artifact_location).delete_artifacts()
            except OSError:
                pass  # nothing was written
            client.delete_logged_model(model.model_id)


def sweep_dead_runs() -> list[str]:
    """Runs left RUNNING by a kftune command that is gone (kill -9, power loss) are marked KILLED."""
    import mlflow

    client = mlflow.MlflowClient()
    dead = []
    for run in client.search_runs(_kftune_experiments(client), "attributes.status = 'RUNNING'", max_results=1000):
        run_owner = run.data.tags.get("kftune.owner", "")
        if run_owner and not _alive(run_owner, run.data.tags.get("kftune.owner_where", "")):
            dead.append(_close(client, run.info.run_id, "KILLED", f"its kftune process ({run_owner}) is gone"))
    return dead


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the URI, when the tracking store cannot be reached."""
    from kftune.config import KftuneError

    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).read()
        except OSError as exc:
            raise KftuneError(f"cannot reach the MLflow tracking server at {uri} ({exc}); start it, or unset "
                              f"MLFLOW_TRACKING_URI to use the local sqlite store") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not os.access(db.parent, os.W_OK):
            raise KftuneError(f"the MLflow store {uri}: folder {db.parent} is not writable")
        create_sqlite_store(db)


def create_sqlite_store(db: Path) -> None:
    """Build a new sqlite store under a temporary name and link it into place. MLflow's schema migrations
    commit one by one: a kill during the first command's set-up left a store no later command could open
    ("table ... already exists")."""
    if db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        SqlAlchemyStore(f"sqlite:///{tmp}", (db.parent / "mlartifacts").as_uri()).engine.dispose()
        os.link(tmp, db)  # never replaces a store another command created meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def check_s3(url: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the endpoint and bucket, when an s3:// location cannot be reached (one try, no
    retries: boto3's default would retry for minutes)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    from kftune.config import KftuneError

    bucket = url.removeprefix("s3://").split("/", 1)[0]
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or ""
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1, "mode": "standard"})
    try:
        boto3.client("s3", endpoint_url=endpoint or None, config=config).head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        raise KftuneError(f"cannot reach S3 bucket {bucket!r} at {endpoint or 'the AWS default endpoint'} for {url} "
                          f"({exc}); check MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL, the credentials and that the "
                          f"bucket exists") from None
