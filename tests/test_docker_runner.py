"""What `--runner docker` checks before any container starts (no Docker engine needed for these)."""

import logging
from pathlib import Path

import pytest

from kftune.config import ConfigError
from kftune.containers import tracking_server, warn_if_stale
from kftune.tracking import git_commit

REVISION = "org.opencontainers.image.revision"


def test_an_image_of_other_code_is_named_with_both_commits(caplog):
    with caplog.at_level(logging.WARNING, logger="kftune.containers"):
        warn_if_stale("kftune:old", {REVISION: "0123456789ab" + "0" * 28})
    assert "image kftune:old was built from commit 0123456789ab, this checkout is" in caplog.text
    caplog.clear()
    here = git_commit(Path(__file__).parent)
    with caplog.at_level(logging.WARNING, logger="kftune.containers"):
        warn_if_stale("kftune:same", {REVISION: here})
        warn_if_stale("kftune:unlabelled", {})
    assert caplog.text == ""


def test_the_sqlite_store_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(ConfigError, match="needs an MLflow tracking server: set MLFLOW_TRACKING_URI=http"):
        tracking_server()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="http://127.0.0.1:1 does not answer"):
        tracking_server()
