"""`kftune score`: a registered version's metrics on any labelled file, the same numbers evaluate reports.

Texts (CSV/TSV/JSONL/Parquet with ingest.text_column and ingest.label_column) get accuracy, macro-F1,
per-class P/R/F1, ECE and the confusion matrix; tagged sentences (CoNLL or JSONL, for a token
classification version) get entity P/R/F1 overall and per type (seqeval, strict IOB2), macro entity F1,
token accuracy and the word-level confusion matrix. The file is scored as given: no duplicate is dropped
(a published test set counts every row), only rows with an empty text or label, and those are counted.
With a training file the baselines evaluate reports (majority class and TF-IDF + logistic regression;
for NER, each word's most frequent training tag) are fitted on it and scored on the same rows.

Each score is an MLflow run in register.experiment whose metrics are linked to the version's logged model
and to the scored file as a dataset, so the model's page in the MLflow UI lists every file it was scored on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path

from kftune.config import Params, load_params

log = logging.getLogger(__name__)


def _unknown(found: Counter, labels: list[str], source: str, what: str, model: str) -> None:
    from kftune.tables import DataError  # pandas: not at import, the CLI's parser imports this module

    bad = {k: n for k, n in found.items() if k not in labels}
    if bad:
        listed = ", ".join(f"{k!r} ({n})" for k, n in sorted(bad.items(), key=lambda kv: -kv[1])[:5])
        raise DataError(f"{source}: {what} {listed} are not among {model}'s labels {labels}; a version can only be "
                        f"scored on its own label set (rename the labels, or score a version trained on them)")


def _labelled_texts(source: str, params: Params, labels: list[str], model_label: str):
    """The rows of `source` with a text and a label (normalised as ingest does), and how many had neither."""
    from kftune.tables import DataError, normalise, normalise_label, read_tables

    df, _ = read_tables(source, params.ingest)  # names the missing text/label column and the file
    df = df.assign(text=df["text"].map(normalise), label=df["label"].map(normalise_label))
    empty = (df["text"] == "") | (df["label"] == "")
    df = df[~empty]
    if df.empty:
        raise DataError(f"{source}: no row has both a text and a label")
    _unknown(Counter(df["label"]), labels, source, f"column {params.ingest.label_column!r} has labels", model_label)
    return df, int(empty.sum())


def score_texts(model, tokenizer, source: str, params: Params, model_label: str, train: str | None = None) -> dict:
    """Sequence classification metrics of `model` (and, given `train`, of the baselines) on every labelled
    row of `source`."""
    from kftune.metrics import classification_metrics
    from kftune.predict import labels_of, predict_proba_with
    from kftune.steps.evaluate import baseline_probs
    from kftune.tables import DataError

    labels = labels_of(model)
    df, skipped = _labelled_texts(source, params, labels, model_label)
    probs = predict_proba_with(model, tokenizer, df["text"].tolist(), params.evaluate.batch_size)
    y = df["label"].map({lbl: i for i, lbl in enumerate(labels)}).to_numpy()
    out = {"task": "sequence-classification", "labels": labels, "rows": len(df), "skipped_empty": skipped,
           "primary": "macro_f1", "metrics": classification_metrics(y, probs, labels, params.evaluate.ece_bins)}
    if train:
        fit, _ = _labelled_texts(train, params, labels, model_label)
        if fit["label"].nunique() < 2:
            raise DataError(f"--train {train}: every row has the label {fit['label'].iloc[0]!r}; a TF-IDF baseline "
                            f"needs at least two labels to learn from")
        out["baselines"] = {k: classification_metrics(y, p, labels, params.evaluate.ece_bins)
                            for k, p in baseline_probs(fit, df, labels, params.evaluate).items()}
        out["train"] = {"input": train, "rows": len(fit)}
    return out


def _tagged(source: str, params: Params, labels: list[str], model_label: str):
    from kftune.tables import read_sentences

    df, info = read_sentences(source, dataclasses.replace(params.ingest, labels=[]))
    _unknown(Counter(t for tags in df["tags"] for t in tags), labels, source, "tags", model_label)
    return [list(t) for t in df["tokens"]], [list(t) for t in df["tags"]], info["bio_repairs"]


def score_sentences(model, tokenizer, source: str, params: Params, model_label: str, train: str | None = None) -> dict:
    """Token classification metrics of `model` (and, given `train`, of the memorisation baseline) on every
    tagged sentence of `source`."""
    from kftune.metrics import entity_metrics, label_confusion
    from kftune.ner import Sentence, memorization_baseline
    from kftune.predict import labels_of, word_predictions

    labels = labels_of(model)
    tokens, gold, repairs = _tagged(source, params, labels, model_label)
    pred, _ = word_predictions(model, tokenizer, tokens, params.evaluate.batch_size)
    metrics = entity_metrics(gold, pred)
    per_type = metrics["per_type"]
    metrics["macro_entity_f1"] = sum(c["f1"] for c in per_type.values()) / len(per_type) if per_type else 0.0
    flat_gold, flat_pred = [t for s in gold for t in s], [t for s in pred for t in s]
    metrics["confusion_matrix"] = label_confusion(flat_gold, flat_pred, labels)
    out = {"task": "token-classification", "labels": labels, "rows": len(gold), "words": len(flat_gold),
           "bio_repairs": repairs, "primary": "entity_f1", "metrics": metrics}
    if train:
        seen_tokens, seen_tags, _ = _tagged(train, params, labels, model_label)
        seen = [Sentence(k, t, 0) for k, t in zip(seen_tokens, seen_tags)]
        out["baselines"] = {"memorization": entity_metrics(gold, memorization_baseline(seen, tokens))}
        out["train"] = {"input": train, "rows": len(seen)}
    return out


def _log(result: dict, params: Params) -> str:
    """One MLflow run for this score; its metrics are linked to the version's logged model and the file."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from kftune.fileio import file_sha256
    from kftune.registry import logged_model_id
    from kftune.tracking import experiment_id

    mv = mlflow.MlflowClient().get_model_version(result["model"], result["version"])
    src = result["input"]
    local = Path(src)
    uri = local.resolve().as_uri() if local.exists() else src
    with warnings.catch_warnings():  # mlflow registers its local-file source twice ("" and "file") and says so
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
    dataset = MetaDataset(source, name=local.name, digest=file_sha256(local)[:16] if local.is_file() else None)
    m, primary = result["metrics"], result["primary"]
    metrics = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({f"{b}_{primary}": bm[primary] for b, bm in result.get("baselines", {}).items()})
    with mlflow.start_run(experiment_id=experiment_id(params.register.experiment),
                          run_name=f"score v{result['version']} on {local.name}",
                          tags={"kftune.kind": "score", "kftune.model": result["model"],
                                "kftune.version": str(result["version"])}) as run:
        mlflow.log_input(dataset, context="score")
        mlflow.log_metrics(metrics, model_id=logged_model_id(mv), dataset=dataset)
        mlflow.log_dict(result, "score.json")
    return run.info.run_id


def score(model_ref: str, source: str, params: Params, output: str | Path | None = None,
          train: str | None = None, log_run: bool = True) -> dict:
    """Score a registered version on a labelled file.

    Args:
        model_ref: NAME (its champion), NAME@alias or NAME/version.
        source: a labelled file or folder: texts (CSV/TSV/JSONL/Parquet) or, for a token classification
            version, tagged sentences (CoNLL or JSONL).
        params: settings (ingest columns and encoding, evaluate batch size and ECE bins, register.experiment).
        output: optional JSON file for the result (written whole or not at all).
        train: optional labelled file of the same kind to fit the baselines on.
        log_run: record the score as an MLflow run linked to the version (its id is `run_id`).

    Returns:
        model, version, input, task, labels, rows, the metrics (and the baselines').
    """
    from kftune.fileio import write_json
    from kftune.registry import load_components
    from kftune.serving.model import parse_model_ref, resolve_version

    name, alias, version = parse_model_ref(model_ref)
    version = resolve_version(name, alias, version)
    parts = load_components(f"models:/{name}/{version}")
    model, tokenizer = parts["model"], parts["tokenizer"]
    label = f"{name} v{version}"
    token_task = type(model).__name__.endswith("ForTokenClassification")
    result = (score_sentences if token_task else score_texts)(model, tokenizer, str(source), params, label,
                                                               str(train) if train else None)
    result = {"model": name, "version": version, "input": str(source), **result}
    if log_run:
        result["run_id"] = _log(result, params)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_json(output, result, sort_keys=False)
    return result


def render(result: dict) -> str:
    """The result as a few aligned lines: headline numbers, per class (per type), the confusion matrix."""
    m, labels = result["metrics"], result["labels"]
    head = f"{result['model']} v{result['version']} on {result['input']}: {result['rows']} "
    if result["task"] == "token-classification":
        lines = [head + f"sentences, {result['words']} words",
                 f"entity F1 {m['entity_f1']:.4f}  precision {m['precision']:.4f}  recall {m['recall']:.4f}  "
                 f"macro entity F1 {m['macro_entity_f1']:.4f}  token accuracy {m['token_accuracy']:.4f}",
                 "", f"{'type':<20} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}"]
        per = m["per_type"]
    else:
        lines = [head + f"rows ({result['skipped_empty']} without text or label skipped)",
                 f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f}",
                 "", f"{'label':<20} {'precision':>9} {'recall':>7} {'F1':>7} {'support':>8}"]
        per = m["per_class"]
    lines += [f"{k[:20]:<20} {c['precision']:>9.4f} {c['recall']:>7.4f} {c['f1']:>7.4f} {c['support']:>8}"
              for k, c in per.items()]
    if result.get("baselines"):
        primary = result["primary"]
        lines += ["", f"baselines fitted on {result['train']['input']} ({result['train']['rows']} rows): " + ", ".join(
            f"{b} {bm[primary]:.4f}" for b, bm in result["baselines"].items()) + f" ({primary.replace('_', ' ')})"]
    width = max(8, *(len(lbl) for lbl in labels))
    lines += ["", "confusion (rows: true, columns: predicted)" + (", per word" if "words" in result else ""),
              " " * width + " " + " ".join(f"{lbl[:width]:>{width}}" for lbl in labels)]
    lines += [f"{lbl[:width]:<{width}} " + " ".join(f"{v:>{width}}" for v in row)
              for lbl, row in zip(labels, m["confusion_matrix"])]
    return "\n".join(lines)


def cmd_score(args) -> int:
    from kftune.tracking import configure

    params = load_params(args.params, args.set or [])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure(args.project_dir)
    result = score(args.model, args.input, params, args.output, args.train, log_run=not args.no_log)
    print(render(result))
    if result.get("run_id"):
        print(f"\nlogged as MLflow run {result['run_id']} (experiment {params.register.experiment!r})")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def add_commands(sub) -> None:
    """Register `score` on the kftune command's subparsers."""
    p = sub.add_parser("score", help="score a registered version on a labelled file (texts, or CoNLL for NER)",
                       epilog="examples:\n  kftune score --model kftune-demo@champion --input golden.csv\n"
                              "  kftune score --model kftune-demo/3 --input test.conll --output metrics.json\n"
                              "  kftune score --model kftune-demo --input dev.csv --train train.csv  # with baselines")
    p.add_argument("--model", required=True, help="NAME (its champion), NAME@alias or NAME/VERSION")
    p.add_argument("--input", required=True, help="labelled CSV/TSV/JSONL/Parquet (ingest.text_column, "
                                                  "ingest.label_column), or CoNLL/JSONL sentences for NER")
    p.add_argument("--train", help="labelled file of the same kind to fit the baselines on (TF-IDF + logistic "
                                   "regression and majority; memorisation for NER), scored on the same rows")
    p.add_argument("--output", help="also write the metrics as JSON here")
    p.add_argument("--no-log", action="store_true", help="do not record the score as an MLflow run")
    p.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. -S ingest.text_column=sentence (repeatable)")
    p.set_defaults(func=cmd_score)

