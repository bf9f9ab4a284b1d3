"""The numbers every step reports: macro-F1, calibration, per-class and entity-level metrics."""

from __future__ import annotations

import numpy as np


def macro_f1(y_true, y_pred, n_labels: int) -> float:
    """Mean F1 over the labels in y_true or y_pred (sklearn's default): a label absent from both has no F1,
    and counting it as 0 would understate a file that uses only some of the labels."""
    from sklearn.metrics import f1_score

    seen = set(np.unique(y_true).tolist()) | set(np.unique(y_pred).tolist())
    present = [i for i in range(n_labels) if i in seen]
    return float(f1_score(y_true, y_pred, average="macro", labels=present, zero_division=0)) if present else 0.0


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


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str], ece_bins: int) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    pred = probs.argmax(1)
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, pred, labels=ids, zero_division=0)
    return {
        "accuracy": float((pred == y_true).mean()),
        "macro_f1": macro_f1(y_true, pred, len(labels)),
        "ece": expected_calibration_error(probs, y_true, ece_bins),
        "per_class": {lbl: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, lbl in enumerate(labels)},
        "confusion_matrix": confusion_matrix(y_true, pred, labels=ids).tolist(),
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
