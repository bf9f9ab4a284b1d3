"""The whole loop, fast: tiny model, small batches, the sub-word corpus the tiny model can learn, served by a
real `kftune serve`, real store, real DVC. The drifted hours are half shifted rows (new stems and filler the
champion never saw) and half positive news it knows: a surge of positive predictions and a drift."""

import json

import pandas as pd
import pytest

from kftune.demo.loop import FAST, Plan, run_loop
from tests.conftest import ROOT, subword_texts

pytestmark = pytest.mark.slow


def source(hour: int, rows: int, drift: float):
    if not drift:
        return subword_texts(rows, seed=500 + hour)
    known = subword_texts(2 * rows, seed=900 + hour)
    known = known[known["label"] == "positive"].head(rows // 2)
    shifted = subword_texts(rows - len(known), seed=500 + hour, shifted=True)
    return pd.concat([shifted, known]).sample(frac=1, random_state=hour).reset_index(drop=True)


def test_the_fast_loop_alerts_labels_retrains_and_swaps_without_a_failed_request(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")
    monkeypatch.setenv("KFTUNE_GIT_COMMIT", "test")
    plan = Plan(rows=600, iid_hours=2, drift_hours=2, after_hours=1, per_hour=150, labels=240,
                overrides=[*FAST.overrides, "finetune.max_steps=150", "finetune.eval_every_steps=50"])
    lines = []
    t = run_loop(tmp_path / "loop", ROOT / "params.yaml", [
        f"model.name={tiny_model}", "finetune.batch_size=16", "finetune.learning_rate=2e-3", "finetune.bf16=false",
        "tokenize.max_length=32", "register.model_name=tiny-loop", "register.min_delta=0"],
        plan=plan, source=source, surge_label="positive", surge_share=0.62, echo=lines.append)
    assert t["alert_latency_hours"] == 1, lines  # the first drifted hour's check fires
    fired = {f for e in t["events"] for f in e.get("events", [])}
    assert {"positive-surge firing", "drift firing"} <= fired
    assert t["labels"] == 240 and t["v2_promoted"], lines
    assert t["swap_requests"]["failed"] == 0 and set(t["swap_requests"]["versions"]) == {"1", "2"}
    print("\n".join(lines))
    # live quality is measured before and after on random-sample labels, with intervals. Whether it recovers is
    # not asserted: with the tiny model v2 does not beat v1 on this traffic (see the README's demo numbers)
    for when in ("before", "after"):
        low, high = t[f"live_accuracy_{when}_ci"]
        assert low <= t[f"live_accuracy_{when}"] <= high and high - low < 0.25, t
        assert 0 <= t[f"live_macro_f1_{when}"] <= 1
    assert (tmp_path / "loop" / "demo-loop.png").stat().st_size > 20000
    assert json.loads((tmp_path / "loop" / "timeline.json").read_text())["labels"] == 240
