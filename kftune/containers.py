"""Pipeline tasks in the component image: kfp.local's DockerRunner, set up the way a cluster runs them.

Each task is one container of the image on the host network (so it reaches a tracking server on 127.0.0.1),
as the image's non-root user, with the pipeline root and the project folder mounted at their own paths and
credentials passed as environment variables only, never baked into the image or written to disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from pathlib import Path

from kftune.config import WEBHOOK_ENV, ConfigError, KftuneError

log = logging.getLogger(__name__)

RUNNERS = ("subprocess", "docker")
IMAGE_UID = 1000  # the `kftune` user infra/Dockerfile creates
# what a task may need from the submitter's environment; only the ones that are set travel
# (KFTUNE_OWNER_PID: the host pid of the kftune command, which owns the tasks' MLflow runs)
PASSED_ENV = ("KFTUNE_OWNER_PID", "KFTUNE_OWNER_WHERE", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "KFTUNE_ARTIFACT_ROOT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "HF_TOKEN", WEBHOOK_ENV)
RUN_LABEL = "kftune.run"  # on every task container: `docker ps --filter label=kftune.run` finds them


class ContainerError(KftuneError):
    pass


def tracking_server() -> str:
    """The MLflow server the containers log to (MLFLOW_TRACKING_URI); raise if there is none or it does not answer.

    The local sqlite store cannot be shared with containers: they would each need the file mounted, and
    SQLite's locking over a bind mount from several processes in other namespaces is not safe.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"--runner docker needs an MLflow tracking server: set MLFLOW_TRACKING_URI=http://HOST:PORT (now "
            f"{uri or 'unset'}). The local sqlite store cannot be shared with containers safely; start one with "
            f"`mlflow server --host 127.0.0.1 --port 5000` or the kftune-mlflow image (README: Containers)")
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"MLFLOW_TRACKING_URI={uri} does not answer ({exc}): start the tracking server first, "
                          f"on an address the containers reach (they use the host network)") from None
    return uri


def _engine(image: str):
    try:
        import docker
    except ImportError:
        raise ContainerError("--runner docker needs the `docker` Python package: pip install docker") from None
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # docker raises DockerException, requests' ConnectionError, FileNotFoundError...
        raise ContainerError(f"no Docker engine answers ({type(exc).__name__}: {exc}); start one "
                             f"(infra/scripts/ensure-docker.sh installs and starts dockerd)") from None
    try:
        return client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ContainerError(f"image {image} is not on this Docker engine: build it with `make image` "
                             f"(or pass --image)") from None
    finally:
        client.close()


def _mounts(project_dir: Path, arguments: dict) -> list:
    """The project folder, plus any local data or data repo outside it, bound at their own paths."""
    from docker.types import Mount

    paths = {project_dir: False}
    for key in ("data_path", "data_repo"):
        value = str(arguments.get(key) or "")
        if value and "://" not in value and Path(value).exists():
            path = Path(value).resolve()
            folder = path if path.is_dir() else path.parent
            if project_dir not in (folder, *folder.parents):
                paths[folder] = key == "data_path"  # the data is read only; a DVC repo may write .dvc/tmp
    return [Mount(str(p), str(p), type="bind", read_only=ro) for p, ro in paths.items()]


def _writable_by_image_user(folders: list[Path]) -> None:
    """As root, hand the folders the tasks write to the image's user (it is not root, and the bind mount keeps
    host ownership). As anyone else, tasks run under the caller's own uid instead."""
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for p in (folder, *folder.rglob("*")):
            if p.stat().st_uid != IMAGE_UID:
                shutil.chown(p, IMAGE_UID, IMAGE_UID)


def warn_if_stale(image: str, labels: dict) -> None:
    """Warn when the image holds other code than this checkout: the tasks run the image's kftune, while the
    settings they are given come from this one (a key one side does not know fails the settings task)."""
    from kftune.tracking import git_commit

    built, here = labels.get("org.opencontainers.image.revision", ""), git_commit(Path(__file__).parent)
    if built and here not in ("unknown", built):
        log.warning("image %s was built from commit %s, this checkout is %s: its tasks run the image's code; "
                    "`make image` rebuilds it from HEAD", image, built[:12],
                    here[:12] + (" with uncommitted changes" if here.endswith("-dirty") else ""))


def stop_containers(run_id: str, grace: int = 3) -> list[str]:
    """Stop the task containers of one `kftune run --runner docker` (kfp's DockerRunner starts them detached: they
    are not the command's children, and an interrupted command would leave one training); returns their names."""
    import docker

    client = docker.from_env()
    try:
        found = client.containers.list(filters={"label": f"{RUN_LABEL}={run_id}"})
        for container in found:
            container.stop(timeout=grace)
        return [c.name for c in found]
    finally:
        client.close()


def docker_runner(image: str, pipeline_root: Path, project_dir: Path, arguments: dict, run_id: str):
    """A kfp.local.DockerRunner for kftune's tasks in `image`, after checking the server, engine and image."""
    from kfp import local

    tracking_server()
    warn_if_stale(image, _engine(image).labels or {})
    run_args: dict = {"network_mode": "host", "mounts": _mounts(project_dir, arguments),
                      "environment": {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)},
                      "labels": {RUN_LABEL: run_id, "kftune.project": str(project_dir)}}
    if os.geteuid() == 0:
        _writable_by_image_user([pipeline_root, Path(arguments.get("checkpoint_root") or pipeline_root)])
    else:
        run_args["user"] = f"{os.geteuid()}:{os.getegid()}"
    return local.DockerRunner(**run_args)
