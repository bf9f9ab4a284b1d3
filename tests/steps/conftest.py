"""A champion shared by the resolve and drift step tests (training it once saves a minute)."""

import shutil

import pytest

from kftune import registry
from kftune.steps.evaluate import evaluate
from kftune.steps.finetune import finetune
from kftune.steps.register import PROMOTE, register
from kftune.steps.resolve import FIRST_TRAINING, resolve
from kftune.steps.tokenize import tokenize
from tests.conftest import subword_texts, tiny_params, use_mlflow_store


def train_champion(root, params, data_dir) -> str:
    """tokenize -> fine-tune -> evaluate -> register -> promote on a resolve output; returns the version."""
    tokenize(data_dir, root / "tok", params.model.name, params.tokenize)
    finetune(root / "tok", root / "model", params.model.name, params.finetune)
    evaluate(data_dir, root / "model", root / "eval", params.evaluate)
    d = register(data_dir, root / "model", root / "eval", root / "gate", params)
    assert d.decision == PROMOTE
    registry.promote(params.register.model_name, d.version, "test", expected_champion=d.champion_version)
    return d.version


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
def champion(store, tmp_path):
    """A copy of the champion's data folder (tests add files to it) in a fresh tmp_path."""
    shutil.copytree(store / "data", tmp_path / "data")
    return tmp_path / "data"
