"""Feedback through the real server: POST /v2/models/NAME/feedback round-trips by request id, with auth."""

import json
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import requests

from kftune.monitor.feedback import FeedbackError, import_feedback, joined, live_quality, read_feedback, wilson
from kftune.serving.request_log import RequestLog, read_request_log, records
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
    bad = requests.post(url, headers={**auth, "Content-Type": "application/json"}, timeout=10,
                        data=json.dumps({"request_id": "req-1", "label": "positive", "labeller": "\ud800"}))
    assert bad.status_code == 422 and "body.labeller: not valid Unicode" in bad.json()["error"], bad.text
    ok = requests.post(url, headers=auth, timeout=10, json={"feedback": [
        {"request_id": "req-1", "index": 0, "label": "positive", "labeller": "ann"},
        {"request_id": "req-1", "index": 1, "label": "negative"}]})
    assert ok.status_code == 200 and ok.json()["accepted"] == 2
    # a correction must name a prediction: an unknown id, or an index past the request's texts, is refused whole
    bad = requests.post(url, headers=auth, timeout=10, json={"feedback": [
        {"request_id": "req-1", "index": 0, "label": "negative"}, {"request_id": "req-404", "label": "positive"},
        {"request_id": "req-1", "index": 2, "label": "positive"}]})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"].startswith("feedback[1]: request_id 'req-404' is not in the request log; feedback[2]: "
                                          "index 2: request 'req-1' had 2 text(s): feedback must name a prediction")
    # an id this server never answered but an earlier one logged is found in the log's files
    old = RequestLog(str(server.log_dir), 10, 0.1, 100)
    old.append(records("req-old", SimpleNamespace(name=MODEL, version="1", precision="fp32",
                                                  task="sequence-classification", labels=["negative", "positive"]),
                       ["the group said lossira"], [{"label": "negative", "probability": 0.9,
                                                     "probabilities": {"negative": 0.9, "positive": 0.1}}]))
    old.close()
    assert requests.post(url, headers=auth, timeout=10, json={"request_id": "req-old", "label": "negative"}).ok
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(read_request_log(str(server.log_dir))) < 3:
        time.sleep(0.2)
    log = read_request_log(str(server.log_dir))
    assert log[log["request_id"] == "req-1"]["text"].tolist() == [texts[0], "mail <EMAIL> about the lossira unit"]
    log = log[log["request_id"] == "req-1"]
    both = joined(log, read_feedback(str(server.log_dir)))
    assert both.set_index("index")["true_label"].to_dict() == {0: "positive", 1: "negative"}
    assert both["labeller"].tolist() == ["ann", ""] and set(both["request_id"]) == {"req-1"}


def test_a_reused_request_id_joins_its_correction_to_the_latest_prediction_once():
    log = pd.DataFrame({"request_id": ["1", "1", "2"], "index": [0, 0, 0], "text": ["old", "new", "other"],
                        "label": ["negative", "positive", "positive"],
                        "time": pd.to_datetime(["2026-12-01 10:00", "2026-12-01 11:00", "2026-12-01 10:30"], utc=True)})
    feedback = pd.DataFrame({"request_id": ["1"], "index": [0], "label": ["positive"], "sample": ["random"],
                             "labeller": [""], "time": pd.to_datetime(["2026-12-01 11:05"], utc=True)})
    both = joined(log, feedback)
    assert both[["text", "true_label"]].values.tolist() == [["new", "positive"]]
    # the id reused the next day, after the correction: the correction stays with the prediction it was about
    again = pd.DataFrame({"request_id": ["1"], "index": [0], "text": ["next day"], "label": ["negative"],
                          "time": pd.to_datetime(["2026-12-02 09:00"], utc=True)})
    both = joined(pd.concat([log, again]), feedback)
    assert both[["text", "true_label"]].values.tolist() == [["new", "positive"]]
    # a correction older than every prediction of its id (a replay's client clocks): the latest prediction
    early = feedback.assign(time=pd.to_datetime(["2026-11-30 00:00"], utc=True))
    assert joined(log, early)[["text", "true_label"]].values.tolist() == [["new", "positive"]]


def test_a_later_correction_keeps_the_sample_a_queue_drew_its_prediction_into(tmp_path):
    """A user correcting through the API a prediction the queue had labelled as part of the random sample: the
    new label counts, in the random sample still (it would otherwise drop out of live accuracy, and the
    predictions users correct are mostly wrong ones)."""
    from kftune.monitor.feedback import write_feedback

    log_dir, day = str(tmp_path), pd.Timestamp("2026-12-01", tz="UTC")
    write_feedback(log_dir, [{"request_id": "a", "label": "negative", "sample": "random", "time": day},
                             {"request_id": "b", "label": "negative", "sample": "uncertain", "time": day},
                             {"request_id": "c", "label": "negative", "sample": "uncertain", "time": day}])
    write_feedback(log_dir, [{"request_id": "a", "label": "positive", "time": day + pd.Timedelta(hours=1)},
                             {"request_id": "b", "label": "positive", "sample": "random",
                              "time": day + pd.Timedelta(hours=1)},
                             {"request_id": "d", "label": "positive", "time": day + pd.Timedelta(hours=1)}])
    got = read_feedback(log_dir).set_index("request_id")
    assert got["label"].to_dict() == {"a": "positive", "b": "positive", "c": "negative", "d": "positive"}
    assert got["sample"].to_dict() == {"a": "random", "b": "random", "c": "uncertain", "d": ""}
    assert list(read_feedback(log_dir).columns) == ["request_id", "index", "label", "labeller", "source", "sample",
                                                   "time"]


def _logged(log_dir, ids: dict[str, int], model: str = MODEL) -> None:
    """Predictions in a request log: request id -> number of texts."""
    served = SimpleNamespace(name=model, version="1", precision="fp32", task="sequence-classification",
                             labels=["negative", "positive"])
    out = RequestLog(str(log_dir), 1000, 60, 1000)
    for rid, n in ids.items():
        out.append(records(rid, served, [f"text {rid} {i}" for i in range(n)],
                           [{"label": "positive", "probability": 0.8, "probabilities": {"negative": 0.2,
                                                                                        "positive": 0.8}}] * n))
    out.close()


def test_bulk_feedback_import_checks_every_row_first(tmp_path):
    f, log_dir = tmp_path / "fb.csv", str(tmp_path / "log")
    _logged(log_dir, {"a": 1, "b": 2})
    _logged(log_dir, {"c": 1}, model="another-model")
    pd.DataFrame({"request_id": ["a", "b", ""], "label": ["positive", "bullish", "negative"]}).to_csv(f, index=False)
    with pytest.raises(FeedbackError) as e:
        import_feedback(str(f), log_dir, ["negative", "positive"], model=MODEL)
    assert f"{f}:3: label 'bullish'" in str(e.value) and f"{f}:4: empty request_id" in str(e.value)
    assert read_feedback(log_dir).empty
    # ids the request log does not have (for this model), or an index past the request's texts: refused, by line
    pd.DataFrame({"request_id": ["a", "zz-unknown", "b", "c"], "index": ["0", "0", "2", "0"],
                  "label": ["positive"] * 4}).to_csv(f, index=False)
    with pytest.raises(FeedbackError) as e:
        import_feedback(str(f), log_dir, ["negative", "positive"], model=MODEL)
    assert f"3 row(s) name no prediction logged in {log_dir} for {MODEL}" in str(e.value)
    assert f"{f}:3: request_id 'zz-unknown' is not in the request log" in str(e.value)
    assert f"{f}:4: index 2: request 'b' had 2 text(s)" in str(e.value)
    assert f"{f}:5: request_id 'c' is not in the request log" in str(e.value) and ":2:" not in str(e.value)
    assert read_feedback(log_dir).empty
    pd.DataFrame({"request_id": ["a", "b", "a"], "index": ["0", "1", "0"],
                  "label": ["positive", "negative", "negative"]}).to_csv(f, index=False)
    assert import_feedback(str(f), log_dir, ["negative", "positive"], model=MODEL) == 3
    assert read_feedback(log_dir).set_index("request_id")["label"].to_dict() == {"a": "negative", "b": "negative"}
    # JSON Lines where only some rows give `index`; a digit that is not a whole number is refused, not a crash
    (tmp_path / "fb.jsonl").write_text('{"request_id": "b", "label": "positive", "index": 1, "labeller": "bo"}\n'
                                       '{"request_id": "a", "label": "positive"}\n')
    assert import_feedback(str(tmp_path / "fb.jsonl"), log_dir, ["negative", "positive"], "team", MODEL) == 2
    stored = read_feedback(log_dir).set_index(["request_id", "index"])
    assert stored["label"].to_dict() == {("a", 0): "positive", ("b", 1): "positive"}
    assert stored["labeller"].to_dict() == {("a", 0): "team", ("b", 1): "bo"} and set(stored["sample"]) == {""}
    pd.DataFrame({"request_id": ["a"], "index": ["²"], "label": ["positive"]}).to_csv(f, index=False)
    with pytest.raises(FeedbackError, match=r"fb.csv:2: index '²' is not a whole number"):
        import_feedback(str(f), log_dir, ["negative", "positive"], model=MODEL)


def test_kftune_feedback_import_refuses_an_unknown_request_id(store, tiny_model, tmp_path, capsys):
    from kftune.cli import main
    from tests.conftest import ROOT

    log_dir = tmp_path / "log"
    _logged(log_dir, {"r-1": 1})
    f = tmp_path / "fb.csv"
    pd.DataFrame({"request_id": ["r-1", "r-2"], "label": ["negative", "positive"]}).to_csv(f, index=False)
    args = ["--project-dir", str(tmp_path), "feedback", "import", str(f), "--log-dir", str(log_dir),
            "--params", str(ROOT / "params.yaml"), "-S", f"model.name={tiny_model}", "-S", f"register.model_name={MODEL}"]
    assert main(args) == 2
    assert f"{f}:3: request_id 'r-2' is not in the request log" in capsys.readouterr().err
    pd.DataFrame({"request_id": ["r-1"], "label": ["negative"]}).to_csv(f, index=False)
    assert main(args) == 0 and "stored 1 correction(s)" in capsys.readouterr().out


def test_live_quality_uses_only_the_random_sample_and_its_interval_covers_the_truth():
    lo, hi = wilson(80, 100, 0.95)
    assert 0.70 < lo < 0.72 and 0.86 < hi < 0.88  # the textbook Wilson interval for 80/100
    assert [wilson(n, n, 0.95)[1] for n in (20, 60)] == [1.0, 1.0], "all right: the upper bound is 1, not 1 - 2e-16"
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
    assert macro_f1(y, p, ["a", "b", "c", "d"]) == pytest.approx(  # "d": in neither, so no F1 to average
        f1_score(y, p, average="macro", zero_division=0))
