"""resolve: the latest data version against the champion's, split into what is new and what is history.

Every registered version carries the rows it was trained on as a `reference/` artifact (see
register). Rows of the latest data that are not among the champion's are new; the rest are
history. The challenger's training set is the new training rows plus a seeded replay sample of
the historical ones; it is tested on the new test rows and, separately, on the historical test rows,
which never move because a row's split is a hash of its text.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from kftune import registry
from kftune.config import Params
from kftune.fileio import read_json, write_json
from kftune.predict import MODEL_INFO
from kftune.tables import (DataError, describe, describe_sentences, load_rows, load_sentences, require_splits,
                           split_settings, write_dataset)

log = logging.getLogger(__name__)

NOTHING_NEW, FIRST_TRAINING, NEW_DATA = "nothing-new", "first-training", "new-data"
REFERENCE = "reference"  # artifact folder of every model version's run: rows.parquet + card.json


def reference_rows(data_dir: str | Path) -> pd.DataFrame:
    """All rows of the data version a model was trained on (text, label, split)."""
    data_dir = Path(data_dir)
    if (data_dir / "reference.parquet").exists():
        return pd.read_parquet(data_dir / "reference.parquet")
    return pd.concat([pd.read_parquet(data_dir / f"{s}.parquet").assign(split=s)
                      for s in ("train", "validation", "test")], ignore_index=True)


def download_reference(name: str, version: str, dest: str | Path) -> tuple[pd.DataFrame, dict]:
    """The champion's reference rows and card; the error names the version and the artifact path."""
    import mlflow

    run_id = mlflow.MlflowClient().get_model_version(name, version).run_id
    where = f"runs:/{run_id}/{REFERENCE} of {name} v{version}"
    try:
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE, dst_path=str(dest)))
        return pd.read_parquet(folder / "rows.parquet"), read_json(folder / "card.json")
    except Exception as exc:  # missing artifact, unreachable store, corrupt file: all mean "no reference"
        raise DataError(f"cannot read the champion's reference data at {where} (registered by an older kftune, "
                        f"or its artifacts were deleted?): {type(exc).__name__}: {exc}") from None


def export_champion(name: str, version: str, dest: str | Path, task: str = "sequence-classification") -> dict:
    """Save the champion's model and tokenizer as a transformers folder; return what it is.

    Later steps (drift, a warm-started fine-tune) read this copy, so one pipeline run uses one
    champion even if the alias moves meanwhile.
    """
    import mlflow

    from kftune.predict import labels_of

    parts = registry.load_components(f"models:/{name}/{version}")
    dest = Path(dest)
    parts["model"].save_pretrained(dest)
    parts["tokenizer"].save_pretrained(dest)
    run = mlflow.MlflowClient().get_run(mlflow.MlflowClient().get_model_version(name, version).run_id)
    return {"version": version, "labels": labels_of(parts["model"]), "base_model": run.data.params.get("model.name", ""),
            "task": task}


def warm_start(champion: dict, labels: list[str], params: Params) -> str:
    """Where the challenger starts: "champion vN", or "base: <why not the champion>"."""
    if params.retrain.warm_start == "base":
        return "base: retrain.warm_start=base"
    if champion["labels"] != labels:
        return f"base: the label set changed from {champion['labels']} to {labels}"
    if champion["base_model"] != params.model.name:
        return f"base: model.name={params.model.name!r} but the champion was fine-tuned from {champion['base_model']!r}"
    return f"champion v{champion['version']}"


def _texts(df: pd.DataFrame) -> pd.Series:
    """A row's text as retraining compares it; tagged sentences by their words (a word may hold a space)."""
    return df["tokens"].map("\x1f".join) if "tokens" in df.columns else df["text"]


def _labels(df: pd.DataFrame) -> pd.Series:
    return df["tags"].map("\x1f".join) if "tags" in df.columns else df["label"]


def split_new(latest: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(new, historical): rows of `latest` the reference lacks, and rows it has (a relabelled text is new;
    tagged sentences the same, by words and tags, so a retagged sentence is new).

    A text the reference has keeps the reference's split, relabelled or not, whatever split this data
    version gives it: the historical test stays frozen, and a text the champion trained on never becomes a
    test row (nor a test row a training one).
    """
    frozen = pd.Series(reference["split"].to_numpy(), index=_texts(reference).to_numpy())
    frozen = frozen[~frozen.index.duplicated()]
    texts = _texts(latest)
    was = texts.map(frozen)
    moved = int((was.notna() & (was != latest["split"])).sum())
    if moved:
        log.info("resolve: %d rows keep the champion's split for their text (this data version gives another)", moved)
    latest = latest.assign(split=was.fillna(latest["split"]))
    key = texts + "\t" + _labels(latest)
    seen = key.isin(set(_texts(reference) + "\t" + _labels(reference)))
    return latest[~seen].reset_index(drop=True), latest[seen].reset_index(drop=True)


def training_set(new: pd.DataFrame, history: pd.DataFrame, replay_fraction: float, seed: int) -> pd.DataFrame:
    """New rows in all splits, a replay sample of historical training rows, all historical validation rows.

    The historical test rows are left out: they are the frozen test of forgetting.
    """
    hist_train = history[history["split"] == "train"]
    replay = hist_train.sample(n=round(replay_fraction * len(hist_train)), random_state=seed)
    return pd.concat([new, replay, history[history["split"] == "validation"]], ignore_index=True)


def start_retraining_run(params: Params, run_name: str = "", task_id: str = "") -> str:
    """The MLflow run that records one retraining decision: counts, drift scores, outcome (task_id: see
    kftune.tracking.task_attempt)."""
    import mlflow

    from kftune.tracking import configure, experiment_id, owner_tags, task_attempt

    configure()
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id(f"{params.register.experiment}-retraining"), run_name=run_name or None,
                            tags={"kftune.model_name": params.register.model_name, "kftune.params_hash": params.digest(),
                                  **owner_tags(), **task_attempt(client, task_id)})
    return run.info.run_id


def _log(run_id: str, card: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for key in ("latest_rows", "new_rows", "historical_rows", "replayed_rows"):
        if key in card:
            client.log_metric(run_id, key, card[key])
    for key in ("status", "champion_version", "warm_start"):
        if card.get(key) is not None:
            client.set_tag(run_id, f"kftune.{key}", str(card[key]))
    for key, value in card.get("lineage", {}).items():
        client.set_tag(run_id, f"kftune.{key}", str(value))


def resolve(source: str, out_data: str | Path, out_champion: str | Path, params: Params, lineage: dict | None = None,
            run_id: str = "") -> dict:
    """Compare the latest data with the champion's and write the challenger's dataset.

    Args:
        source: the latest data (a local path, usually materialised from the DVC repo's newest commit).
        out_data: ingest-format output: {train,validation,test}.parquet, historical_test.parquet,
            new.parquet (the new rows, for the drift step), reference.parquet (every row, saved with
            the model this data trains) and data_card.json.
        out_champion: the champion exported as a model folder, with its reference.parquet (empty
            unless there is new data to compare).
        params: all settings (ingest, retrain, register.model_name).
        lineage: where the data came from, kept in the data card.
        run_id: the retraining run's MLflow run, recorded in the data card for later steps.

    Returns:
        The data card, whose `status` is first-training, nothing-new or new-data.
    """
    lineage = {**(lineage or {"data_path": source}), **({"retrain_run_id": run_id} if run_id else {})}
    card = _resolve(source, Path(out_data), Path(out_champion), params, lineage)
    if run_id:
        _log(run_id, card)
        if card["status"] == NOTHING_NEW:  # the pipeline ends here
            from kftune.tracking import finish_run

            finish_run(run_id)
    return card


def _resolve(source: str, out_data: Path, out_champion: Path, params: Params, lineage: dict) -> dict:
    name = params.register.model_name
    out_champion.mkdir(parents=True, exist_ok=True)
    champion = registry.version_by_alias(name, registry.CHAMPION)
    tagged = params.task == "token-classification"
    latest, info = (load_sentences if tagged else load_rows)(source, params.ingest)
    describe_rows = describe_sentences if tagged else describe
    columns = ("text", "tokens", "tags") if tagged else ("text", "label")
    card = {"task": params.task, **info, "lineage": lineage, "champion_version": champion or "",
            "latest_rows": len(latest)}

    if champion is None:
        require_splits(latest, source)
        card.update(status=FIRST_TRAINING, new_rows=len(latest), **describe_rows(latest))
        write_dataset(out_data, latest, card, {"reference": latest, "new": latest}, columns)
        log.info("resolve: no champion of %s yet: first training on %d rows", name, len(latest))
        return card

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        reference, ref_card = download_reference(name, champion, tmp)
    then, now = ref_card.get("split") or {"split_salt": ref_card.get("split_salt")}, split_settings(params.ingest)
    if tagged and "split" in ref_card:  # before mask_pii was a split setting it did nothing to tagged sentences
        then = {"mask_pii": False, **then}
    changed = [f"ingest.{k}={now[k]!r} (champion v{champion}: {v!r})" for k, v in then.items() if now[k] != v]
    if changed:
        raise DataError(f"{', '.join(changed)}: rows would change split, and the champion's training rows would "
                        f"leak into the historical test (or its test rows into training); keep the champion's split "
                        f"settings, or start over with `kftune run`")
    new, history = split_new(latest, reference)
    labels = ref_card["labels"]
    unknown = sorted({t for ts in new["tags"] for t in ts} - set(labels) if tagged else set(new["label"]) - set(labels))
    if unknown and not params.retrain.allow_label_change:
        raise DataError(f"{source}: new rows have {'tags' if tagged else 'labels'} {unknown} that champion v{champion} "
                        f"of {name} does not predict ({labels}); set retrain.allow_label_change=true to train a "
                        f"challenger with the new {'tag' if tagged else 'label'} set (from the base model, held for "
                        f"a person's approval)")
    card.update(labels=labels if not unknown else info["labels"], champion_labels=labels,
                new_rows=len(new), historical_rows=len(history),
                new_rows_by_split={s: int((new["split"] == s).sum()) for s in ("train", "validation", "test")},
                champion_data_commit=ref_card.get("lineage", {}).get("data_commit", ""))
    if new.empty:
        card.update(status=NOTHING_NEW, **describe_rows(latest))
        write_dataset(out_data, latest.iloc[:0], card, columns=columns)
        log.info("resolve: nothing new since champion v%s (%d rows, all seen)", champion, len(latest))
        return card

    train = training_set(new, history, params.retrain.replay_fraction, params.finetune.seed)
    hist_test = history[history["split"] == "test"]
    card.update(status=NEW_DATA, replayed_rows=int((train["split"] == "train").sum()) - card["new_rows_by_split"]["train"],
                historical_test_rows=len(hist_test), **describe_rows(train))
    exported = export_champion(name, champion, out_champion, params.task)
    card["warm_start"] = warm_start(exported, card["labels"], params)
    write_json(out_champion / MODEL_INFO, {**exported, "warm_start": card["warm_start"].startswith("champion")})
    reference.to_parquet(out_champion / "reference.parquet")  # the drift step's reference side
    # saved with the challenger as the next retraining's reference: every row, in the split it was used in
    write_dataset(out_data, train, card, {"historical_test": hist_test[list(columns)], "new": new,
                                          "reference": pd.concat([new, history], ignore_index=True)}, columns)
    log.info("resolve: %d new rows since champion v%s, %d historical; training on %s", len(new), champion,
             len(history), card["rows"])
    return card
