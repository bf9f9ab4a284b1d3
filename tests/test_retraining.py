"""End to end: the retraining pipeline through kfp.local on DVC data versions, with the tiny model."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from kftune import registry
from kftune.config import load_params
from kftune.data import DATASET, add_batches
from kftune.local import run_retraining_local
from kftune.fileio import Busy
from kftune.steps.resolve import resolve
from tests.conftest import subword_texts, train_champion

pytestmark = pytest.mark.slow
NO_COOLDOWN = ["retrain.cooldown_hours=0"]


def add(project, name, df, params):
    path = project.parent / f"{name}.csv"
    df.to_csv(path, index=False)
    add_batches([str(path)], project, params.ingest, tag=name)


def training_runs(params) -> int:
    exp = MlflowClient().get_experiment_by_name(params.register.experiment)
    return len(MlflowClient().search_runs([exp.experiment_id])) if exp else 0


def test_retraining_follows_the_data_and_survives_a_kill(project):  # noqa: F811
    params = load_params(project / "params.yaml", NO_COOLDOWN)
    name = params.register.model_name
    add(project, "batch-0", subword_texts(1200, seed=0), params)
    # the first champion through the steps in-process (the pipeline's first-training path costs 40 s more;
    # tests/steps cover it): its reference rows are batch-0
    resolve(str(project / DATASET), project.parent / "r0", project.parent / "c0", params)
    train_champion(project.parent, params, project.parent / "r0")

    again = run_retraining_local(params, project)
    assert (again["status"], again["retrain"], again["champion"]) == ("nothing-new", "skip", "1")
    assert not again["drift_scores"], "nothing new: the drift step does not even run"

    add(project, "shifted", subword_texts(1500, seed=2, shifted=True), params)
    # a retraining killed in the middle of training leaves the champion alone
    cmd = [sys.executable, "-m", "kftune.cli", "--project-dir", str(project), "retrain", "-S", NO_COOLDOWN[0]]
    proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while training_runs(params) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the retraining finished before it could be killed"
        with pytest.raises(Busy, match="another kftune retraining run is running"):
            run_retraining_local(params, project)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"

    retrained = run_retraining_local(params, project)
    assert retrained["status"] == "new-data" and retrained["drift"] == "true" and retrained["retrain"] == "retrain"
    assert retrained["decision"] == "promote" and retrained["champion"] == retrained["challenger_version"] != "1"
    tags = MlflowClient().get_model_version(name, retrained["champion"]).tags
    assert tags["kftune.warm_start"] == "champion v1"
    reasons = tags["kftune.reasons"]
    assert "historical test macro-F1" in reasons and "champion" in reasons, reasons
    new_f1, champion_f1 = float(tags["kftune.test_macro_f1"]), float(tags["kftune.reference_score"])
    assert new_f1 > champion_f1 + 0.2, "the shifted data broke the old champion and the challenger learned it"
    assert float(tags["kftune.historical_macro_f1"]) > 0.9, "and it still knows the old data"
    assert tags["kftune.data_commit"] and tags["kftune.retrain_run_id"] == retrained["run_id"]
