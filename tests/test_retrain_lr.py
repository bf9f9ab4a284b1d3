"""retrain.learning_rate: a challenger that warm-starts from the champion trains at it; one from the base model
trains at finetune.learning_rate. Checked through the fine-tune component with real artifacts."""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

from components.finetune import finetune_op
from kftune.fileio import write_json


def _run(tmp_path, params, name: str, warm_start: bool) -> dict:
    champion = tmp_path / f"champion-{name}"
    shutil.copytree(params.model.name, champion)  # stands in for resolve's export of the champion
    write_json(champion / "kftune.json", {"warm_start": warm_start})
    model = SimpleNamespace(path=str(tmp_path / name), metadata={})
    finetune_op.python_func(tokenized=SimpleNamespace(path=str(tmp_path / "tokenized")), params=params.to_dict(),
                            checkpoint_root="", run_name=name, model=model,
                            init_model=SimpleNamespace(path=str(champion)))
    return json.loads((tmp_path / name / "train_summary.json").read_text())


def test_a_warm_started_challenger_trains_at_retrain_learning_rate(prepared, params, mlflow_store):
    params = dataclasses.replace(
        params, finetune=dataclasses.replace(params.finetune, max_steps=4, eval_every_steps=4, learning_rate=2e-3),
        retrain=dataclasses.replace(params.retrain, learning_rate=3e-4))
    assert _run(prepared, params, "warm", warm_start=True)["learning_rate"] == 3e-4
    assert _run(prepared, params, "fresh", warm_start=False)["learning_rate"] == 2e-3


def test_auto_is_a_fixed_share_of_the_fresh_rate():
    from kftune.config import WARM_START_FACTOR, load_params
    from tests.conftest import ROOT

    retrain = load_params(ROOT / "params.yaml").retrain
    assert retrain.learning_rate == "auto"
    assert retrain.warm_learning_rate(1e-4) == 1e-4 * WARM_START_FACTOR == 3e-5  # MiniLM's measured warm rate
    assert dataclasses.replace(retrain, learning_rate="2e-4").warm_learning_rate(1e-3) == 2e-4
    assert dataclasses.replace(retrain, learning_rate="fast").problems() == [
        "retrain.learning_rate='fast': must be a number in (0, 1), or auto"]
