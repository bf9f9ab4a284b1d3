"""A champion shared by the resolve and drift step tests (training it once saves a minute)."""

import shutil

import pytest

from kftune.steps.resolve import FIRST_TRAINING, resolve
from tests.conftest import subword_texts, tiny_params, train_champion, use_mlflow_store


@pytest.fixture(scope="package")
def store(tmp_path_factory, tiny_model):
    """One MLflow store for tests/steps with champion v1 trained on 1,200 sub-word rows (old.csv)."""
    root = tmp_path_factory.mktemp("champion")
    params = tiny_params(tiny_model)
    (root / "data").mkdir()
    subword_texts(1200).to_csv(root / "data" / "old.csv", index=False)
    with pytest.MonkeyPatch.context() as mp:
        use_mlflow_store(root, mp)
        card = resolve(str(root / "data"), root / "r0", root / "c0", params)
        assert card["status"] == FIRST_TRAINING and card["new_rows"] == 1200
        train_champion(root, params, root / "r0")
        yield root


@pytest.fixture
def champion(store, tmp_path, monkeypatch):
    """A copy of the champion's data folder (tests add files to it) in a fresh tmp_path, with MLflow pointed
    at the shared store again (a test with its own store before this one moved MLflow's global URI)."""
    import mlflow

    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    shutil.copytree(store / "data", tmp_path / "data")
    return tmp_path / "data"
