"""evaluate: test-split metrics for the model and two baselines trained on the same train split."""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from kftune.config import EvaluateConfig
from kftune.console import markdown_cell
from kftune.fileio import atomic_dir, write_csv, write_json
from kftune.metrics import classification_metrics, entity_metrics, label_confusion, score_cells
from kftune.predict import labels_of, predict_proba_with

log = logging.getLogger(__name__)


def baseline_probs(train: pd.DataFrame, test: pd.DataFrame, labels: list[str], cfg: EvaluateConfig) -> dict:
    """Test-set probabilities of the majority-class and TF-IDF + logistic-regression baselines."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    y = train["label"].map({lbl: i for i, lbl in enumerate(labels)}).to_numpy()
    prior = np.bincount(y, minlength=len(labels)) / len(y)
    def tfidf(**vectorizer):
        return make_pipeline(TfidfVectorizer(sublinear_tf=True, **vectorizer), LogisticRegression(C=cfg.tfidf_c,
                                                                                                 max_iter=2000))

    try:
        model = tfidf(ngram_range=(1, cfg.tfidf_ngram_max)).fit(train["text"], y)
    except ValueError as exc:  # no word of two or more letters in any training text (emoji, single CJK characters)
        if "empty vocabulary" not in str(exc):
            raise
        log.warning("evaluate: the training texts have no words of two or more characters; the TF-IDF baseline "
                    "reads character n-grams (1-3) instead")
        model = tfidf(analyzer="char_wb", ngram_range=(1, 3)).fit(train["text"], y)
    tfidf_probs = np.zeros((len(test), len(labels)))
    tfidf_probs[:, model.classes_] = model.predict_proba(test["text"])
    return {"majority": np.tile(prior, (len(test), 1)), "tfidf_logreg": tfidf_probs}


def _plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, n = np.array(matrix), len(labels)
    side = min(1.2 * n + 2, 24)  # 24 inches at most: 150 intents made an 18,000-pixel image Pillow refuses
    fig, ax = plt.subplots(figsize=(side, side - 0.5))
    ax.imshow(m, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="test confusion matrix")
    font = max(3, min(10, 300 / n))
    ax.set_xticklabels(labels, fontsize=font, rotation=90 if n > 12 else 0)
    ax.set_yticklabels(labels, fontsize=font)
    if n <= 30:  # beyond, the counts are unreadable: evaluation.json has them
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def headline(metrics: dict) -> dict:
    """metrics.json for `dvc metrics show` / `dvc exp show`: a few flat numbers, the gate's metric first.

    Everything else (per-class, confusion matrix, every baseline metric) is in evaluation.json.
    """
    primary, baseline, model = metrics["primary"], metrics["baseline"], metrics["model"]
    out = {primary: model[primary]}
    out.update({k: v for k, v in model.items() if isinstance(v, float) and k != primary})
    out.update({f"{name}_{primary}": m[primary] for name, m in metrics["baselines"].items()})
    out[f"beats_{baseline}_by"] = model[primary] - metrics["baselines"][baseline][primary]
    if metrics.get("historical"):
        out[f"historical_{primary}"] = metrics["historical"][primary]
    out["test_rows"] = metrics["test_rows"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _embedded_png(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_html(markdown_text: str, png: Path) -> str:
    """report.md as one self-contained HTML page (the image inlined), which MLflow's artifact view renders;
    its Markdown view leaves a relative image as a bare link."""
    body = []
    rows: list[list[str]] = []

    def flush_table():
        if rows:
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
            rows.clear()

    for line in markdown_text.split("\n"):  # not splitlines(): data may hold \x85 or \u2028 (markdown_cell too)
        if line.startswith("|"):
            if not re.fullmatch(r"\|(?:-+\|)+", line.strip()):  # the header's separator is no row
                # a cell is split on " | " (an escaped one is "\|"), then markdown_cell's escapes undone for HTML
                rows.append([html.escape(re.sub(r"\\(.)", r"\1", c.strip()))
                             for c in re.split(r"(?<!\\) \| ", line.strip().strip("|"))])
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            body.append(f'<img alt="confusion matrix" src="{_embedded_png(png)}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = "body{font-family:sans-serif}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px}"
    return f"<!doctype html><html><head><meta charset=utf-8><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def render_report(metrics: dict) -> str:
    rows = [("model", metrics["model"])] + list(metrics["baselines"].items())
    lines = [f"# Evaluation on the test split ({metrics['test_rows']} rows)", "",
             "| system | accuracy | macro-F1 | ECE |", "|---|---|---|---|"]
    lines += [f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['ece']:.4f} |" for name, m in rows]
    lines += ["", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {markdown_cell(lbl)} | {score_cells(c)} | {c['support']} |" for lbl, c in metrics["model"]["per_class"].items()]
    if "historical" in metrics:
        h = metrics["historical"]
        lines += ["", f"Frozen historical test split ({metrics['historical_rows']} rows): accuracy {h['accuracy']:.4f}, "
                      f"macro-F1 {h['macro_f1']:.4f}, ECE {h['ece']:.4f}."]
    return "\n".join(lines) + "\n\n![confusion matrix](confusion_matrix.png)\n"


def _scored(model, tok, texts: list[str], cfg: EvaluateConfig, bf16: bool, what: str) -> np.ndarray:
    """predict_proba_with in chunks, logging progress with elapsed time and ETA between them."""
    from kftune.progress import Progress

    chunk, progress = cfg.batch_size * 8, Progress(what, len(texts), "texts")
    parts = []
    for i in range(0, len(texts), chunk):
        parts.append(predict_proba_with(model, tok, texts[i : i + chunk], cfg.batch_size, bf16))
        progress.update(len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, len(labels_of(model))))


def _write_metrics(folder: Path, metrics: dict) -> None:
    write_json(folder / "evaluation.json", metrics)
    write_json(folder / "metrics.json", headline(metrics), sort_keys=False)  # the headline number first


def _write_report(folder: Path, text: str) -> None:
    (folder / "report.md").write_text(text, encoding="utf-8")
    (folder / "report.html").write_text(render_html(text, folder / "confusion_matrix.png"), encoding="utf-8")


def evaluate(data_dir: str | Path, model_dir: str | Path, out_dir: str | Path, cfg: EvaluateConfig,
             bf16: bool = False) -> dict:
    """Score the fine-tuned model and the baselines on the test split.

    Args:
        data_dir: ingest output (train.parquet for the baselines, test.parquet to score; when retraining,
            historical_test.parquet is scored too).
        model_dir: fine-tune output.
        out_dir: folder for metrics.json (flat headline numbers, for DVC), evaluation.json (everything),
            report.md, report.html (the same, self-contained), confusion_matrix.{json,png} and predictions.csv.
        cfg: the `evaluate` section of params.yaml.
        bf16: predict under bf16 autocast (kftune.hardware.bf16_for decides it from finetune.bf16).

    Returns:
        The metrics written to evaluation.json.
    """
    data_dir = Path(data_dir)
    train, test = pd.read_parquet(data_dir / "train.parquet"), pd.read_parquet(data_dir / "test.parquet")
    historical = data_dir / "historical_test.parquet"  # retraining: the frozen test of forgetting
    if "tags" in test.columns:
        hist = pd.read_parquet(historical) if historical.exists() else None
        return evaluate_tokens(train, test, model_dir, Path(out_dir), cfg, bf16, hist)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tok = AutoModelForSequenceClassification.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    labels = labels_of(model)
    probs = _scored(model, tok, test["text"].tolist(), cfg, bf16, "evaluate: test split")
    y = test["label"].map({lbl: i for i, lbl in enumerate(labels)}).to_numpy()
    metrics = {
        "labels": labels,
        "test_rows": len(test),
        "primary": "macro_f1",  # what the gate compares
        "baseline": "tfidf_logreg",  # the baseline the gate requires beating
        "model": classification_metrics(y, probs, labels, cfg.ece_bins),
        "baselines": {name: classification_metrics(y, p, labels, cfg.ece_bins)
                      for name, p in baseline_probs(train, test, labels, cfg).items()},
    }
    if historical.exists() and len(hist := pd.read_parquet(historical)):
        hist_probs = _scored(model, tok, hist["text"].tolist(), cfg, bf16, "evaluate: historical test split")
        y_hist = hist["label"].map({lbl: i for i, lbl in enumerate(labels)}).to_numpy()
        metrics["historical"] = classification_metrics(y_hist, hist_probs, labels, cfg.ece_bins)
        metrics["historical_rows"] = len(hist)
    with atomic_dir(out_dir) as tmp:
        _write_metrics(tmp, metrics)
        write_json(tmp / "confusion_matrix.json", {"labels": labels, "matrix": metrics["model"]["confusion_matrix"]})
        _plot_confusion(metrics["model"]["confusion_matrix"], labels, tmp / "confusion_matrix.png")
        _write_report(tmp, render_report(metrics))
        write_csv(test.assign(predicted=[labels[i] for i in probs.argmax(1)], confidence=probs.max(1).round(4)),
                  tmp / "predictions.csv")
    log.info("evaluate: macro-F1 model %.4f, tfidf %.4f, majority %.4f", metrics["model"]["macro_f1"],
             metrics["baselines"]["tfidf_logreg"]["macro_f1"], metrics["baselines"]["majority"]["macro_f1"])
    return metrics


def evaluate_tokens(train: pd.DataFrame, test: pd.DataFrame, model_dir: str | Path, out_dir: Path,
                    cfg: EvaluateConfig, bf16: bool = False, historical: pd.DataFrame | None = None) -> dict:
    """Token classification: entity-level P/R/F1 (seqeval, strict IOB2) overall and per type, token
    accuracy, for the model and for the memorisation baseline (each word's most frequent training tag);
    the model's also on the frozen `historical` test sentences when retraining."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from kftune.ner import Sentence, memorization_baseline
    from kftune.predict import labels_of, word_predictions

    model = AutoModelForTokenClassification.from_pretrained(model_dir)
    tokens, gold = [list(t) for t in test["tokens"]], [list(t) for t in test["tags"]]
    tok = AutoTokenizer.from_pretrained(model_dir)
    pred, _ = word_predictions(model, tok, tokens, cfg.batch_size, bf16)
    seen = [Sentence(list(k), list(t), 0) for k, t in zip(train["tokens"], train["tags"])]
    metrics = {"task": "token-classification", "labels": labels_of(model), "test_rows": len(test),
               "primary": "entity_f1", "baseline": "memorization", "model": entity_metrics(gold, pred),
               "baselines": {"memorization": entity_metrics(gold, memorization_baseline(seen, tokens))}}
    if historical is not None and len(historical):
        hist_pred, _ = word_predictions(model, tok, [list(t) for t in historical["tokens"]], cfg.batch_size, bf16)
        metrics["historical"] = entity_metrics([list(t) for t in historical["tags"]], hist_pred)
        metrics["historical_rows"] = len(historical)
    rows = [("model", metrics["model"]), ("memorization", metrics["baselines"]["memorization"])]
    lines = [f"# Evaluation on the test split ({len(test)} sentences)", "",
             "| system | entity precision | entity recall | entity F1 | token accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {m['precision']:.4f} | {m['recall']:.4f} | {m['entity_f1']:.4f} | {m['token_accuracy']:.4f} |"
              for n, m in rows]
    lines += ["", "| type | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {markdown_cell(t)} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
              for t, c in metrics["model"]["per_type"].items()]
    if "historical" in metrics:
        h = metrics["historical"]
        lines += ["", f"Frozen historical test split ({metrics['historical_rows']} sentences): entity F1 "
                      f"{h['entity_f1']:.4f} (P {h['precision']:.4f}, R {h['recall']:.4f})."]
    words = pd.DataFrame([(i, w, g, p) for i, (ws, gs, ps) in enumerate(zip(tokens, gold, pred))
                          for w, g, p in zip(ws, gs, ps)], columns=["sentence", "word", "label", "predicted"])
    tags = metrics["labels"]
    matrix = label_confusion(words["label"], words["predicted"], tags)
    with atomic_dir(out_dir) as tmp:
        _write_metrics(tmp, metrics)
        pd.DataFrame({"tokens": tokens, "tags": gold, "predicted": pred}).to_json(
            tmp / "predictions.jsonl", orient="records", lines=True)
        write_csv(words, tmp / "predictions.csv")  # one row per word, for `dvc plots` as for texts
        write_json(tmp / "confusion_matrix.json", {"labels": tags, "matrix": matrix})
        _plot_confusion(matrix, tags, tmp / "confusion_matrix.png")
        _write_report(tmp, "\n".join(lines) + "\n\n![confusion matrix](confusion_matrix.png)\n")
    log.info("evaluate: entity F1 model %.4f, memorization %.4f", metrics["model"]["entity_f1"],
             metrics["baselines"]["memorization"]["entity_f1"])
    return metrics
