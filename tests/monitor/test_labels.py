"""The labelling queue and the label import, on a real DVC project, a real request log and a real store."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chisquare, ks_2samp

from kftune.data import add_batches
from kftune.demo.drift import setup_project
from kftune.monitor.feedback import read_feedback, write_feedback
from kftune.monitor.labels import DRIFT, RANDOM, UNCERTAIN, LabelError, import_labels, queue, select
from tests.conftest import subword_texts
from tests.monitor.conftest import monitor_params, write_traffic

START = 1_700_000_000.0


def test_the_random_share_is_uniform_over_the_traffic_and_blind_to_confidence():
    rng = np.random.default_rng(1)
    n = 400
    cands = pd.DataFrame({"text": [f"t{i} word{i % 7}" for i in range(n)], "probability": rng.uniform(0.3, 1, n)})
    counts = np.zeros(n)
    picked_probs = []
    for seed in range(300):
        q = select(cands, 40, 0.5, 0.25, {"t", "word1"}, seed)
        r = q[q["sample"] == RANDOM]
        assert len(r) == 20 and r.index.is_unique and len(q) == 40 and q.index.is_unique
        counts[r.index] += 1
        picked_probs += r["probability"].tolist()
    assert chisquare(counts).pvalue > 0.01  # every text equally likely
    assert ks_2samp(picked_probs, cands["probability"]).pvalue > 0.01  # not skewed towards (un)confident ones
    # a text served three times is three predictions to the random share, one text to the others
    twice = pd.concat([cands, cands.iloc[:2], cands.iloc[:2]], ignore_index=True)
    q = select(twice, 404, 0.5, 0.25, {"t"}, 0)
    r, chosen = q[q["sample"] == RANDOM], q[q["sample"] != RANDOM]
    assert len(r) == 202 and chosen["text"].is_unique and not set(chosen["text"]) & set(r["text"])
    assert len(q) == 202 + len(set(twice["text"]) - set(r["text"]))
    # an earlier queue's drift and uncertain picks (the hard cases): still in the random draw, not chosen again
    hard = pd.Series(cands["probability"] < 0.5, index=cands.index)
    counts = np.zeros(n)
    for seed in range(300):
        q = select(cands, 40, 0.5, 0.25, {"t", "word1"}, seed, labelled=hard)
        counts[q[q["sample"] == RANDOM].index] += 1
        assert not hard[q[q["sample"] != RANDOM].index].any()
    assert chisquare(counts).pvalue > 0.01
    q = select(cands, 40, 0.5, 0.25, {"t"}, 0)
    rest = cands.drop(q.index)
    assert q[q["sample"] == UNCERTAIN]["probability"].max() <= rest["probability"].min() or \
        len(q[q["sample"] == DRIFT]) < 10


@pytest.fixture
def dvc_project(tmp_path, params):
    root = tmp_path / "proj"
    setup_project(root)
    first = tmp_path / "first.csv"
    subword_texts(200, seed=3).to_csv(first, index=False)
    add_batches([str(first)], root, params.ingest, push=False)
    return root


def test_queue_then_import_refuses_unknown_labels_and_known_texts_and_adds_a_version(store, tiny_model, tmp_path,
                                                                                       dvc_project):
    params = monitor_params(tiny_model)
    log_dir = tmp_path / "log"
    rows = write_traffic(log_dir, START, [0.3, 0.5], per_hour=100)
    picked = queue(str(log_dir), params, 60, tmp_path / "queue")
    assert picked["rows"] == 60 and picked["by_sample"][RANDOM] == 30 and picked["labels"] == ["negative", "positive"]
    q = pd.read_csv(tmp_path / "queue" / "queue.csv", dtype=str, keep_default_na=False)
    assert set(q["sample"]) <= {RANDOM, DRIFT, UNCERTAIN} and (q["unbiased"] == "True").sum() == 30
    tasks = json.loads((tmp_path / "queue" / "queue-labelstudio.json").read_text())
    assert len(tasks) == 60 and tasks[0]["data"]["request_id"] == q["request_id"][0]
    assert 'Choice value="negative"' in (tmp_path / "queue" / "label-config.xml").read_text()

    truth = {r["request_id"]: r["label"] for r in rows}
    q["label"] = [truth[r] for r in q["request_id"]]
    q.loc[3, "label"] = "bullish"
    q.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LabelError, match=r"1 label\(s\) not in champion v1's label set \['negative', 'positive'\]: "
                                         r"line 5: 'bullish'"):
        import_labels(tmp_path / "bad.csv", params, dvc_project, str(log_dir), labeller="ann")

    q.loc[3, "label"] = "negative"
    twice = q.copy()  # one text labelled twice, differently: refused, naming both lines
    twice.loc[6, "text"], twice.loc[6, "label"] = twice.loc[5, "text"], \
        "negative" if twice.loc[5, "label"] == "positive" else "positive"
    twice.to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(LabelError, match=r"the same text has different labels \(line 7, line 8\).*settle on one"):
        import_labels(tmp_path / "twice.csv", params, dvc_project, str(log_dir), labeller="ann")
    known = subword_texts(200, seed=3)["text"][0]  # a text the dataset already has
    q.loc[4, "text"] = known
    q.to_csv(tmp_path / "good.csv", index=False)
    out = import_labels(tmp_path / "good.csv", params, dvc_project, str(log_dir), labeller="ann", push=False)
    assert out["added"] == 59 and out["dropped_existing"] == 1 and len(out["commit"]) == 40
    batch = pd.read_csv(dvc_project / out["files"][0], dtype=str, keep_default_na=False)
    assert len(batch) == 59 and set(batch["source"]) == {"label-import"} and set(batch["labeller"]) == {"ann"}
    assert known not in set(batch["text"]) and set(batch["request_id"]) <= set(q["request_id"])
    fb = read_feedback(str(log_dir))
    assert len(fb) == 60 and (fb["sample"] == RANDOM).sum() == 30

    again = import_labels(tmp_path / "good.csv", params, dvc_project, str(log_dir), push=False)  # idempotent
    assert again["added"] == 0 and again["commit"] is None and again["dropped_existing"] == 60
    assert len(read_feedback(str(log_dir))) == 60
    # the next queue's random draw leaves out the random sample's 30 only; its drift and uncertain shares leave out
    # all 60; a user's correction through the API leaves out nothing (users correct wrong answers: leaving those
    # out would overrate the model's live accuracy)
    left = [r for r in rows if r["request_id"] not in set(q["request_id"])]
    write_feedback(str(log_dir), [{"request_id": left[0]["request_id"], "label": "negative"}])
    assert queue(str(log_dir), params, 500, tmp_path / "queue2")["candidates"] == 200 - 30
    q2 = pd.read_csv(tmp_path / "queue2" / "queue.csv", dtype=str, keep_default_na=False)
    assert not set(q2["request_id"]) & set(q[q["sample"] == RANDOM]["request_id"])
    assert not set(q2[q2["sample"] != RANDOM]["request_id"]) & set(q["request_id"])
    # a queue being labelled in place is not replaced by a new one
    q.to_csv(tmp_path / "queue" / "queue.csv", index=False)
    with pytest.raises(LabelError, match=r"queue\.csv: 60 label\(s\) filled in; a new queue would replace them"):
        queue(str(log_dir), params, 10, tmp_path / "queue")
    assert (pd.read_csv(tmp_path / "queue" / "queue.csv", dtype=str)["label"] == q["label"]).all()


def test_label_import_keeps_feedback_when_the_push_fails_and_reads_spreadsheet_edits(store, tiny_model, tmp_path,
                                                                                      dvc_project):
    from kftune.data import _dvc

    params = monitor_params(tiny_model)
    log_dir = tmp_path / "log"
    rows = write_traffic(log_dir, START, [0.5], per_hour=20)
    (tmp_path / "file").write_text("")
    _dvc(dvc_project, "remote", "add", "-d", "broken", str(tmp_path / "file" / "remote"))  # under a file
    labelled = pd.DataFrame({"request_id": [r["request_id"] for r in rows[:3]] + ["-not-logged"],
                             "index": ["0", "0.0", "", "0"], "text": ["mail a@x.com now", "mail b@y.com now",
                                                                     rows[2]["text"], "another text"],
                             "label": ["negative", "negative", "positive", "positive"]})
    labelled["request_id"] = labelled["request_id"].map(lambda r: "'" + r if r.startswith("-") else r)  # as written
    labelled.to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(Exception, match="push to the DVC remote failed"):
        import_labels(tmp_path / "l.csv", params, dvc_project, str(log_dir), labeller="ann")
    fb = read_feedback(str(log_dir))  # stored before the dataset changed; the unlogged id is not feedback
    assert sorted(fb["request_id"]) == sorted(r["request_id"] for r in rows[:3]) and set(fb["index"]) == {0}
    again = import_labels(tmp_path / "l.csv", params, dvc_project, str(log_dir), push=False)
    assert again["added"] == 0 and again["feedback"] == 3 and again["feedback_unmatched"] == 1
    batch = pd.read_csv(dvc_project / "data/dataset" / sorted(p.name for p in (dvc_project / "data/dataset").iterdir()
                                                               if p.name.startswith("batch-"))[-1], dtype=str)
    # the two e-mail texts are one text once masked: stored once; the escaped request id read back unescaped
    assert batch["text"].tolist().count("mail <EMAIL> now") == 1 and "-not-logged" in set(batch["request_id"])
    labelled["index"] = ["0", "1.5", "", "x"]
    labelled.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LabelError, match=r"index is not a whole number \(line 3: '1.5'; line 5: 'x'\)"):
        import_labels(tmp_path / "bad.csv", params, dvc_project, str(log_dir), push=False)


def test_label_studio_export_is_read_with_its_annotator(store, tiny_model, tmp_path, dvc_project):
    params = monitor_params(tiny_model)
    export = [{"data": {"text": "the group said gainoku today", "request_id": "a1", "index": 0, "sample": "random"},
               "annotations": [{"result": [{"value": {"choices": ["positive"]}}],
                                "completed_by": {"email": "ann@example.com"}}]},
              {"data": {"text": "the unit dropmek", "request_id": "a2"}, "annotations": [
                  {"result": [{"value": {"choices": ["negative"]}}], "completed_by": 7}]},
              {"data": {"text": "the board lossumi", "request_id": "a3"}, "annotations": []}]
    (tmp_path / "export.json").write_text(json.dumps(export))
    out = import_labels(tmp_path / "export.json", params, dvc_project, str(tmp_path / "log"), push=False)
    assert out["added"] == 2 and out["unlabelled"] == 1
    batch = pd.read_csv(dvc_project / out["files"][0], dtype=str)
    assert batch["labeller"].tolist() == ["ann@example.com", "7"] and batch["text"][0] == "the group said gainoku today"
