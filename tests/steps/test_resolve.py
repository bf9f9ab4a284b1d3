import dataclasses
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kftune.fileio import read_json
from kftune.tables import DataError
from kftune.steps.resolve import NEW_DATA, NOTHING_NEW, resolve
from tests.conftest import subword_texts, with_changes


def test_new_rows_history_and_replay(tmp_path, params, store, champion):
    old_test = set(pd.read_parquet(store / "r0" / "test.parquet")["text"])
    old_train = pd.read_parquet(store / "r0" / "train.parquet")
    subword_texts(600, seed=5).to_csv(champion / "new.csv", index=False)
    card = resolve(str(champion), tmp_path / "r1", tmp_path / "c1", params)

    new = pd.read_parquet(tmp_path / "r1" / "new.parquet")
    assert card["status"] == NEW_DATA and card["new_rows"] == len(new) == 600 and card["historical_rows"] == 1200
    assert card["champion_version"] == "1" and card["warm_start"] == "champion v1"
    assert set(pd.read_parquet(tmp_path / "r1" / "historical_test.parquet")["text"]) == old_test, "frozen"
    train = pd.read_parquet(tmp_path / "r1" / "train.parquet")
    replayed = train[train["text"].isin(set(old_train["text"]))]
    assert len(replayed) == card["replayed_rows"] == round(params.retrain.replay_fraction * len(old_train))
    assert set(new[new["split"] == "train"]["text"]) <= set(train["text"])
    assert not set(train["text"]) & old_test, "historical test rows never reach training"
    assert set(pd.read_parquet(tmp_path / "r1" / "test.parquet")["text"]) == set(new[new["split"] == "test"]["text"])
    assert read_json(tmp_path / "c1" / "kftune.json")["warm_start"] is True
    assert (tmp_path / "c1" / "config.json").exists() and (tmp_path / "c1" / "reference.parquet").exists()

    (champion / "new.csv").unlink()
    assert resolve(str(champion), tmp_path / "r2", tmp_path / "c2", params)["status"] == NOTHING_NEW


def test_a_label_outside_the_champions_needs_the_explicit_flag(tmp_path, params, champion):
    pd.DataFrame({"text": [f"the board said unit {i} report" for i in range(50)], "label": "neutral"}).to_csv(
        champion / "new.csv", index=False)
    with pytest.raises(DataError, match=r"labels \['neutral'\] that champion v1 of tiny-test does not predict .*"
                                        r"retrain.allow_label_change=true"):
        resolve(str(champion), tmp_path / "r1", tmp_path / "c1", params)
    allowed = dataclasses.replace(params, retrain=with_changes(params.retrain, allow_label_change=True))
    card = resolve(str(champion), tmp_path / "r1", tmp_path / "c1", allowed)
    assert card["labels"] == ["negative", "neutral", "positive"]
    assert card["warm_start"].startswith("base: the label set changed")


def test_unreadable_reference_names_the_version_and_path(tmp_path, params, champion):
    from urllib.parse import urlparse

    from mlflow import MlflowClient

    subword_texts(100, seed=5).to_csv(champion / "new.csv", index=False)
    client = MlflowClient()
    run_id = client.get_model_version(params.register.model_name, "1").run_id
    reference = Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / "reference"
    shutil.move(reference, tmp_path / "moved")
    try:
        with pytest.raises(DataError, match=f"runs:/{run_id}/reference of tiny-test v1"):
            resolve(str(champion), tmp_path / "r1", tmp_path / "c1", params)
    finally:
        shutil.move(tmp_path / "moved", reference)


def test_changed_split_settings_are_refused(tmp_path, params, champion):
    salted = dataclasses.replace(params, ingest=with_changes(params.ingest, split_salt="other"))
    with pytest.raises(DataError, match=r"ingest.split_salt='other' \(champion v1: 'kftune-v1'\): rows would change"):
        resolve(str(champion), tmp_path / "r1", tmp_path / "c1", salted)
    wider = dataclasses.replace(params, ingest=with_changes(params.ingest, test_fraction=0.3))
    with pytest.raises(DataError, match=r"ingest.test_fraction=0.3 \(champion v1: 0.15\)"):
        resolve(str(champion), tmp_path / "r1", tmp_path / "c1", wider)
    masked = dataclasses.replace(params, ingest=with_changes(params.ingest, mask_pii=True))  # hashes masked texts
    with pytest.raises(DataError, match=r"ingest.mask_pii=True \(champion v1: False\)"):
        resolve(str(champion), tmp_path / "r1", tmp_path / "c1", masked)


def test_a_text_the_champion_has_keeps_its_split_and_tagged_rows_match_by_words_and_tags():
    from kftune.steps.resolve import split_new

    reference = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "x"], "split": ["train", "test", "train"]})
    latest = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["x", "y", "y", "x"],
                           "split": ["test", "train", "test", "test"]})  # this version gives other splits
    new, history = split_new(latest, reference)
    assert history[["text", "split"]].values.tolist() == [["a", "train"], ["b", "test"]], "the historical test is frozen"
    assert new[["text", "label", "split"]].values.tolist() == [["c", "y", "train"], ["d", "x", "test"]], \
        "a relabelled text the champion trained on stays a training row"
    # tagged sentences as `kftune run`'s ingest writes them (no `label` column); a word may hold a space
    tagged = pd.DataFrame({"text": ["x New York City"], "tokens": [["x", "New York", "City"]],
                           "tags": [["O", "B-LOC", "I-LOC"]], "split": ["train"]})
    other = tagged.assign(tokens=[["x", "New", "York City"]])
    assert len(split_new(tagged, tagged)[0]) == 0 and len(split_new(other, tagged)[0]) == 1


def test_the_challengers_reference_keeps_the_split_each_row_was_used_in(tmp_path, params, store, champion):
    """A data version that gives a champion's training text the test split: the text stays a training row, and
    the reference saved with the challenger says so (else the next retraining would test on a trained row)."""
    old = pd.read_parquet(store / "r0" / "reference.parquet")
    old[["text", "label", "split"]].to_csv(champion / "old.csv", index=False)  # the same rows and splits, now given
    trained = old[old["split"] == "train"].iloc[0]
    fresh = subword_texts(300, seed=6).assign(split=["train", "validation", "test"] * 100)
    pd.concat([pd.DataFrame({"text": [trained["text"]], "label": [trained["label"]], "split": ["test"]}), fresh]) \
        .to_csv(champion / "new.csv", index=False)
    assert resolve(str(champion), tmp_path / "r1", tmp_path / "c1", params)["status"] == NEW_DATA
    reference = pd.read_parquet(tmp_path / "r1" / "reference.parquet")
    assert reference.loc[reference["text"] == trained["text"], "split"].tolist() == ["train"]
    assert len(reference) == 1200 + 300 and reference["text"].is_unique
    assert (reference.set_index("text").loc[fresh["text"], "split"].to_numpy() == fresh["split"].to_numpy()).all()


def test_a_failed_resolve_ends_its_retraining_run_as_failed_with_the_cause(tmp_path, params, mlflow_store):
    """A retried resolve task opens a run per attempt: a failed attempt's must not stay RUNNING."""
    import mlflow

    from components.resolve import resolve_op

    class Out:  # a KFP output artifact
        def __init__(self, path):
            self.path, self.metadata = str(path), {}

    with pytest.raises(DataError, match="missing"):
        resolve_op.python_func(data_path=str(tmp_path / "missing"), data_repo="", data_rev="", params=params.to_dict(),
                               run_name="r", data=Out(tmp_path / "d"), champion=Out(tmp_path / "c"))
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["kftune.failure"].startswith("resolve: DataError: ")
