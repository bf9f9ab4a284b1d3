import dataclasses
import logging
import time

import pytest

from kftune.config import RetrainConfig
from kftune.steps.drift import RETRAIN, SKIP, drift, retrain_decision
from kftune.steps.resolve import resolve
from tests.conftest import subword_texts, with_changes

LATER = time.time() + 48 * 3600  # past the 24 h cooldown after the fixture's promotion


def check(tmp_path, params, folder, name, **kwargs):
    resolve(str(folder), tmp_path / f"r-{name}", tmp_path / f"c-{name}", params)
    return drift(tmp_path / f"r-{name}", tmp_path / f"c-{name}", tmp_path / f"d-{name}", params, **kwargs)


def test_iid_data_is_not_drift_and_shifted_data_is(tmp_path, params, champion, caplog):
    subword_texts(600, seed=5).to_csv(champion / "iid.csv", index=False)
    with caplog.at_level(logging.INFO, logger="kftune.progress"):
        iid = check(tmp_path, params, champion, "iid", now=LATER)
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("drift: new rows: 600/600 texts, ") and "ETA 0:00" in m for m in said), said
    assert iid["drift"] is False and iid["flags"] == [], iid["checks"]
    assert iid["decision"] == SKIP and iid["reason"] == "no drift, and 600 new rows < retrain.min_new_rows=1000"
    assert {f.name for f in (tmp_path / "d-iid").iterdir()} == {"drift.json", "report.md", "drift.png"}

    (champion / "iid.csv").unlink()
    subword_texts(600, seed=6, shifted=True).to_csv(champion / "shifted.csv", index=False)
    shifted = check(tmp_path, params, champion, "shifted", now=LATER)
    assert shifted["drift"] is True and {"embedding", "vocabulary", "label"} <= set(shifted["flags"]), shifted["checks"]
    assert shifted["decision"] == RETRAIN and shifted["reason"] == "drift detected"
    assert shifted["checks"]["label"]["details"]["new"]["positive"] > 0.7
    assert "| embedding |" in (tmp_path / "d-shifted" / "report.md").read_text()
    # min_flags counts among the tests that ran: a classifier has no entities test to make up the second flag
    votes = dataclasses.replace(params, drift=with_changes(params.drift, methods=["label", "entities"], min_flags=2))
    one = check(tmp_path, votes, champion, "label-only", now=LATER)
    assert one["voting"] == ["label"] and one["min_flags"] == 1 and one["drift"] is True


def test_cooldown_holds_retraining_unless_forced(tmp_path, params, champion):
    subword_texts(600, seed=6, shifted=True).to_csv(champion / "shifted.csv", index=False)
    held = check(tmp_path, params, champion, "now")
    assert held["drift"] is True and held["decision"] == SKIP and held["reason"].startswith("cooldown: the last promotion")
    forced = check(tmp_path, params, champion, "forced", force=True)
    assert forced["decision"] == RETRAIN and forced["reason"] == "forced; drift detected"


def test_without_a_champion_it_is_a_first_training(tmp_path, params, mlflow_store):
    (tmp_path / "data").mkdir()
    subword_texts(300).to_csv(tmp_path / "data" / "a.csv", index=False)
    report = check(tmp_path, params, tmp_path / "data", "first")
    assert (report["decision"], report["drift"], report["checks"]) == (RETRAIN, None, {})
    assert report["reason"] == "no champion yet: this is the first training"
    assert {f.name for f in (tmp_path / "d-first").iterdir()} == {"drift.json", "report.md"}


@pytest.mark.parametrize("status, rows, split, drifted, force, hours, expected", [
    ("first-training", 500, None, None, False, None, (RETRAIN, "no champion yet")),
    ("nothing-new", 0, None, None, True, None, (SKIP, "nothing new")),
    ("new-data", 5, (5, 0), True, True, None, (SKIP, "5 new rows give 5 training and 0 test rows")),
    ("new-data", 200, (150, 20), True, True, None, (SKIP, "200 new rows give 150 training and 20 test rows")),
    ("new-data", 900, (600, 150, ["positive"]), True, True, None, (SKIP, "the challenger's training rows all have")),
    ("new-data", 900, (600, 150), True, False, 2.0, (SKIP, "cooldown: the last promotion was 2.0 h ago")),
    ("new-data", 900, (600, 150), False, False, 30.0, (SKIP, "no drift, and 900 new rows < retrain.min_new_rows=1000")),
    ("new-data", 900, (600, 150), True, False, 30.0, (RETRAIN, "drift detected")),
    ("new-data", 1200, (800, 200), False, False, None, (RETRAIN, "1200 new rows >= retrain.min_new_rows=1000")),
    ("new-data", 900, (600, 150), False, True, 2.0, (RETRAIN, "forced")),
])
def test_retrain_decision(status, rows, split, drifted, force, hours, expected):
    cfg = RetrainConfig(min_new_rows=1000, min_new_test_rows=50, replay_fraction=0.5, warm_start="champion",
                        learning_rate=3e-5, cooldown_hours=24, allow_label_change=False)
    card = {"status": status, "new_rows": rows}
    if split:
        card["new_rows_by_split"] = {"train": split[0], "test": split[1]}
        card["label_distribution"] = {"train": dict.fromkeys(split[2] if len(split) > 2 else ["negative", "positive"], 9)}
    decision, reason = retrain_decision(card, drifted, cfg, force, hours)
    assert decision == expected[0] and reason.startswith(expected[1])


def test_the_drift_report_shows_a_reason_built_from_labels_as_text():
    from markdown_it import MarkdownIt

    from kftune.steps.drift import render_report

    report = {"decision": "skip", "reason": "labels outside the champion's: ['<img src=x onerror=alert(1)>']",
              "champion_version": "1", "new_rows": 3, "checks": {}}
    shown = MarkdownIt().render(render_report(report))
    assert "<img" not in shown and "&lt;img src=x onerror=alert(1)&gt;" in shown
