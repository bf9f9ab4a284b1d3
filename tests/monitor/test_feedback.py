"""Feedback through the real server: POST /v2/models/NAME/feedback round-trips by request id, with auth."""

import time

import pandas as pd
import pytest
import requests

from kftune.monitor.feedback import FeedbackError, import_feedback, joined, live_quality, read_feedback, wilson
from kftune.serving.request_log import read_request_log
from tests.monitor.conftest import MODEL
from tests.serving.conftest import Server


@pytest.fixture
def server(monitor_store, tmp_path):
    s = Server(monitor_store, MODEL, [], env={"KFTUNE_SERVE_TOKEN": "s3cret"}, log_dir=tmp_path / "log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_feedback_round_trips_by_request_id_and_pii_is_masked_in_the_log(server, tmp_path):
    auth = {"Authorization": "Bearer s3cret"}
    texts = ["the group said gainoku today", "mail jane.doe@example.com about the lossira unit"]
    r = requests.post(f"{server.url}/v2/models/{MODEL}/infer", headers={**auth, "X-Request-ID": "req-1"}, timeout=30,
                      json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}]})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-1"
    url = f"{server.url}/v2/models/{MODEL}/feedback"
    assert requests.post(url, json={"request_id": "req-1", "label": "positive"}, timeout=10).status_code == 401
    bad = requests.post(url, headers=auth, json={"request_id": "req-1", "label": "bullish"}, timeout=10)
    assert bad.status_code == 422 and "'bullish': not one of v1's labels ['negative', 'positive']" in bad.json()["error"]
    ok = requests.post(url, headers=auth, timeout=10, json={"feedback": [
        {"request_id": "req-1", "index": 0, "label": "positive", "labeller": "ann"},
        {"request_id": "req-1", "index": 1, "label": "negative"}]})
    assert ok.status_code == 200 and ok.json()["accepted"] == 2
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(read_request_log(str(server.log_dir))) < 2:
        time.sleep(0.2)
    log = read_request_log(str(server.log_dir))
    assert log["text"].tolist() == [texts[0], "mail <EMAIL> about the lossira unit"]
    both = joined(log, read_feedback(str(server.log_dir)))
    assert both.set_index("index")["true_label"].to_dict() == {0: "positive", 1: "negative"}
    assert both["labeller"].tolist() == ["ann", ""] and set(both["request_id"]) == {"req-1"}


def test_bulk_feedback_import_checks_every_row_first(tmp_path):
    f = tmp_path / "fb.csv"
    pd.DataFrame({"request_id": ["a", "b", ""], "label": ["positive", "bullish", "negative"]}).to_csv(f, index=False)
    with pytest.raises(FeedbackError) as e:
        import_feedback(str(f), str(tmp_path / "log"), ["negative", "positive"])
    assert f"{f}:3: label 'bullish'" in str(e.value) and f"{f}:4: empty request_id" in str(e.value)
    assert read_feedback(str(tmp_path / "log")).empty
    pd.DataFrame({"request_id": ["a", "b", "a"], "label": ["positive", "negative", "negative"]}).to_csv(f, index=False)
    assert import_feedback(str(f), str(tmp_path / "log"), ["negative", "positive"]) == 3
    assert read_feedback(str(tmp_path / "log")).set_index("request_id")["label"].to_dict() == {"a": "negative",
                                                                                              "b": "negative"}


def test_live_quality_uses_only_the_random_sample_and_its_interval_covers_the_truth():
    lo, hi = wilson(80, 100, 0.95)
    assert 0.70 < lo < 0.72 and 0.86 < hi < 0.88  # the textbook Wilson interval for 80/100
    rows = pd.DataFrame({"label": ["a"] * 100 + ["a"] * 50, "true_label": ["a"] * 80 + ["b"] * 20 + ["b"] * 50,
                         "sample": ["random"] * 100 + ["uncertain"] * 50})
    q = live_quality(rows, ["a", "b"], 0.95)
    assert q["n"] == 100 and q["accuracy"] == 0.8 and q["accuracy_low"] == pytest.approx(lo)
    assert q["macro_f1_low"] <= q["macro_f1"] <= q["macro_f1_high"]


def test_macro_f1_agrees_with_sklearn():
    import numpy as np
    from sklearn.metrics import f1_score

    from kftune.monitor.feedback import macro_f1

    rng = np.random.default_rng(0)
    y, p = rng.choice(["a", "b", "c"], 200).tolist(), rng.choice(["a", "b"], 200).tolist()
    assert macro_f1(y, p, ["a", "b", "c", "d"]) == pytest.approx(
        f1_score(y, p, labels=["a", "b", "c", "d"], average="macro", zero_division=0))
