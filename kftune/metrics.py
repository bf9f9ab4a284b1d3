"""The numbers every step reports: macro-F1, calibration, per-class and entity-level metrics."""

from __future__ import annotations

import numpy as np


def confusion(y_true, y_pred, n_labels: int) -> np.ndarray:
    """Counts of (true, predicted) label-id pairs, rows true (sklearn's confusion_matrix without importing
    sklearn: 0.8 s a process). Every id must be a whole number in 0..n_labels-1."""
    y, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    for name, ids in (("true", y), ("predicted", p)):
        bad = ids[~np.isin(ids, np.arange(n_labels))]
        if bad.size:
            raise ValueError(f"{name} label id {bad[0].item()!r} is not one of 0..{n_labels - 1}")
    return np.bincount(y.astype(np.int64) * n_labels + p.astype(np.int64),
                       minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def label_confusion(y_true, y_pred, labels: list[str]) -> list[list[int]]:
    """confusion() of label names, in the order of `labels`; a pair with a name not in `labels` is left out
    (as sklearn's confusion_matrix with labels=...)."""
    ids = {lbl: i for i, lbl in enumerate(labels)}
    pairs = [(ids[t], ids[q]) for t, q in zip(y_true, y_pred) if t in ids and q in ids]
    return confusion([t for t, _ in pairs], [q for _, q in pairs], len(labels)).tolist()


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per label of a confusion matrix, 0 where undefined (zero_division=0)."""
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(0), cm.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(predicted > 0, tp / predicted, 0.0), np.where(actual > 0, tp / actual, 0.0),
                np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0))


def matrix_macro_f1(cm: np.ndarray, n_labels: int | None = None) -> float:
    """Mean F1 over the first n_labels labels of a confusion matrix (all by default) that are in it as true or
    predicted: a label absent from both has no F1 (sklearn's default)."""
    n = len(cm) if n_labels is None else n_labels
    present = ((cm.sum(0) + cm.sum(1)) > 0)[:n]
    return float(_per_class(cm)[2][:n][present].mean()) if present.any() else 0.0


def macro_f1(y_true, y_pred, n_labels: int) -> float:
    """Mean F1 over the labels in y_true or y_pred (sklearn's default): a label absent from both has no F1,
    and counting it as 0 would understate a file that uses only some of the labels."""
    return matrix_macro_f1(confusion(y_true, y_pred, n_labels))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int) -> float:
    """Bin-weighted gap between confidence and accuracy of the top prediction."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs((pred[in_bin] == y_true[in_bin]).mean() - conf[in_bin].mean())
    return float(ece)


def unscored(c: dict) -> bool:
    """A label neither in the truth nor among the predictions: no F1 (macro-F1 leaves it out), not an F1 of 0."""
    return c["support"] == 0 and c.get("predicted", 1) == 0


def score_cells(c: dict) -> str:
    """A label's precision, recall and F1 as Markdown table cells; "-" where `unscored`."""
    return " | ".join("-" if unscored(c) else f"{c[k]:.4f}" for k in ("precision", "recall", "f1"))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str], ece_bins: int) -> dict:
    pred = probs.argmax(1)
    cm = confusion(y_true, pred, len(labels))
    p, r, f = _per_class(cm)
    return {
        "accuracy": float((pred == y_true).mean()),
        "macro_f1": macro_f1(y_true, pred, len(labels)),
        "ece": expected_calibration_error(probs, y_true, ece_bins),
        "per_class": {lbl: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(cm[i].sum()), "predicted": int(cm[:, i].sum())}
                      for i, lbl in enumerate(labels)},
        "confusion_matrix": cm.tolist(),
    }


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level micro precision/recall/F1 and per type (seqeval, strict IOB2), and token accuracy."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    per_type = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                    "support": int(v["support"])} for k, v in report.items() if "avg" not in k}
    pairs = [(g, p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)]
    return {"entity_f1": float(micro["f1-score"]), "precision": float(micro["precision"]),
            "recall": float(micro["recall"]), "token_accuracy": sum(g == p for g, p in pairs) / max(len(pairs), 1),
            "per_type": per_type}
