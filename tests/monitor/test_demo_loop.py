"""The whole loop, fast: tiny model, small batches, the sub-word corpus the tiny model can learn, served by a
real `kftune serve`, real store, real DVC. The drifted hours are shifted rows: filler the champion never saw, 70%
new stems, 80% positive. v1 reads the new negative stems ("crash", "slump") as positive, so its predictions
surge to positive, the drift tests flag the traffic, and labels of that traffic are what v2 needs."""

import json

import pandas as pd
import pytest

from kftune.demo.loop import FAST, Plan, run_loop
from tests.conftest import ROOT, subword_texts

pytestmark = pytest.mark.slow


def source_for(seed: int):
    def source(hour: int, rows: int, drift: float) -> pd.DataFrame:
        return subword_texts(rows, seed=seed + hour, shifted=bool(drift))
    return source


def fast_loop(workdir, tiny_model, seed: int = 500, echo=print, extra: tuple = ()) -> dict:
    plan = Plan(rows=600, iid_hours=2, drift_hours=2, after_hours=1, per_hour=150, labels=240,
                overrides=[*FAST.overrides, "finetune.max_steps=150", "finetune.eval_every_steps=50"])
    return run_loop(workdir, ROOT / "params.yaml", [
        f"model.name={tiny_model}", "finetune.batch_size=16", "finetune.learning_rate=2e-3", "finetune.bf16=false",
        f"finetune.seed={seed}", "tokenize.max_length=96", "register.model_name=tiny-loop",
        # the tiny model's v2 does not learn the new stems from 240 labels (its test macro-F1 tied v1's at
        # max_length 32 and 96), so the default min_delta holds it; 0 lets a tie through, to test the promotion
        # and the swap
        "register.min_delta=0",
        # the warm-start rate this test's expectations were measured at (auto would be 0.3 x 2e-3 = 6e-4)
        "retrain.learning_rate=3e-5", *extra],
        plan=plan, source=source_for(seed), surge_label="positive", surge_share=0.62, echo=echo)


def test_the_fast_loop_alerts_labels_retrains_and_swaps_without_a_failed_request(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")
    monkeypatch.setenv("KFTUNE_GIT_COMMIT", "test")
    lines = []
    t = fast_loop(tmp_path / "loop", tiny_model, echo=lines.append)
    assert t["alert_latency_hours"] == 1, lines  # the first drifted hour's check fires
    fired = {f for e in t["events"] for f in e.get("events", [])}
    assert {"positive-surge firing", "drift firing"} <= fired
    assert t["labels"] == 240 and t["v2_promoted"], lines
    assert t["swap_requests"]["failed"] == 0 and set(t["swap_requests"]["versions"]) == {"1", "2"}
    print("\n".join(lines))
    # live quality before (v1 on the drifted hours) and after (v2 on its own), on random-sample labels with
    # intervals, and v1 re-scored on v2's labelled rows: the paired control says v2 is no worse on that traffic
    for when in ("before", "after"):
        low, high = t[f"live_accuracy_{when}_ci"]
        assert low <= t[f"live_accuracy_{when}"] <= high and high - low < 0.25, t
        assert 0 <= t[f"live_macro_f1_{when}"] <= 1
    same = t["v1_on_the_same_rows"]
    assert same["n"] >= 60 and t["live_accuracy_after"] >= same["accuracy"] - 0.02, t
    assert (tmp_path / "loop" / "demo-loop.png").stat().st_size > 20000
    assert json.loads((tmp_path / "loop" / "timeline.json").read_text())["labels"] == 240
