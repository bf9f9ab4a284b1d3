"""A smoke test of the drift demo's loop on two small batches with the tiny model.

The tiny model cannot learn the demo corpus (its vocabulary is the test stems), so this checks the
loop and its records, not the outcome; `make demo-drift` (MiniLM, 4 batches) shows the outcome.
"""

import json

import pytest

from kftune.config import load_params
from kftune.demo.drift import OVERRIDES, format_timeline, run_drift_demo
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_demo_loop_runs_and_records_every_batch(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")  # restored after the demo sets its own
    monkeypatch.setenv("KFTUNE_GIT_COMMIT", "test")
    params = load_params(ROOT / "params.yaml", OVERRIDES + [
        f"model.name={tiny_model}", "finetune.max_steps=20", "finetune.batch_size=16", "finetune.learning_rate=2e-3",
        "finetune.bf16=false", "tokenize.max_length=32", "retrain.min_new_test_rows=10", "drift.permutations=100",
        "register.model_name=tiny-demo"])
    lines = []
    timeline = run_drift_demo(tmp_path / "demo", params, rows=300, echo=lines.append, batches=((0, 0.0), (1, 1.0)))
    first, shifted = timeline
    assert first["status"] == "first-training" and first["challenger_version"] == "1"
    assert first["decision"] in ("promote", "hold") and first["new_rows"] == 300
    # no champion after a hold: the shifted batch is then a first training too, on both batches
    assert shifted["status"] == ("new-data" if first["champion"] else "first-training")
    assert shifted["challenger_version"] == "2" and shifted["new_rows"] == (300 if first["champion"] else 600)
    assert json.loads((tmp_path / "demo" / "timeline.json").read_text())[1]["batch"] == 1
    assert format_timeline(timeline) in lines[-1]
