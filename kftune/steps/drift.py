"""drift: has the new data moved away from the champion's, and should a challenger be trained?

The reference side is the champion's *held-out* rows (validation and test of the data it was
trained on), never its training rows: on those the champion is overconfident and its embeddings
are tighter, so even i.i.d. new data would look shifted. Every test is run and logged on every
run; `drift.methods` vote and `drift.min_flags` of them must flag drift.

Tagged text (a token-classification champion) gets the same tests read through its entities: the
predicted entity-type distribution, each entity's mean word probability, the share of predicted
entities whose surface form was never an entity in training, and the gold entity types when the
new rows are tagged; embeddings are the encoder's mean-pooled sentence embeddings.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kftune import drift_tests as tests
from kftune import ner, registry
from kftune.config import DriftConfig, Params, RetrainConfig
from kftune.fileio import atomic_dir, read_json, write_json
from kftune.hardware import bf16_for
from kftune.steps.resolve import FIRST_TRAINING, NOTHING_NEW

log = logging.getLogger(__name__)

RETRAIN, SKIP = "retrain", "skip"


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return df.sample(n=n, random_state=seed) if len(df) > n else df


def _unk_rate(tokenizer, seqs: list[list[int]]) -> float:
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    ids = [i for s in seqs for i in s if i not in special]
    return sum(i == tokenizer.unk_token_id for i in ids) / max(len(ids), 1)


def run_checks(champion_dir: str | Path, reference: pd.DataFrame, new: pd.DataFrame, cfg: DriftConfig,
               bf16: bool = False) -> tuple[dict, dict]:
    """Every drift test on the champion's reference rows versus the new rows.

    `new` without a label column (live traffic) skips the true-label test. A tagger's reference
    (with a tags column) goes to `run_tagged_checks`.
    Returns (checks by method, plot data).
    """
    if "tags" in reference.columns:
        return run_tagged_checks(champion_dir, reference, new, cfg, bf16)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kftune.predict import labels_of, predict_logits, softmax
    from kftune.progress import Progress

    model = AutoModelForSequenceClassification.from_pretrained(champion_dir)
    tok = AutoTokenizer.from_pretrained(champion_dir)
    labels = labels_of(model)
    held_out = _sample(reference[reference["split"] != "train"], cfg.max_rows, cfg.seed)
    new_s = _sample(new, cfg.max_rows, cfg.seed)
    sides = {}
    for side, df in (("reference", held_out), ("new", new_s)):
        seqs = tok(df["text"].tolist(), truncation=True, max_length=tok.model_max_length)["input_ids"]
        logits, emb = predict_logits(model, seqs, tok.pad_token_id, cfg.batch_size, bf16, embeddings=True,
                                     progress=Progress(f"drift: {side} rows", len(seqs), "texts"))
        probs = softmax(logits)
        sides[side] = {"emb": emb, "pred": [labels[i] for i in probs.argmax(1)], "conf": probs.max(1),
                       "unk": _unk_rate(tok, seqs)}
    ref, nw = sides["reference"], sides["new"]
    checks = [
        tests.mmd_test(ref["emb"], nw["emb"], cfg.permutations, cfg.alpha, cfg.seed),
        tests.distribution_test("prediction", ref["pred"], nw["pred"], labels, cfg.psi_threshold, cfg.alpha),
        tests.confidence_test(ref["conf"], nw["conf"], cfg.alpha),
        tests.vocabulary_test(reference[reference["split"] == "train"]["text"].tolist(), held_out["text"].tolist(),
                              new_s["text"].tolist(), cfg.oov_increase, (ref["unk"], nw["unk"])),
    ]
    if "label" in new.columns:
        checks.append(tests.distribution_test("label", reference["label"].tolist(), new["label"].tolist(),
                                              sorted(set(labels) | set(new["label"])), cfg.psi_threshold,
                                              cfg.alpha))
    return {c.method: c for c in checks}, sides


def _words(df: pd.DataFrame) -> list[list[str]]:
    """Each row's words: its tokens, or (untagged live text) its text split on whitespace."""
    return [list(t) for t in df["tokens"]] if "tokens" in df.columns else [t.split() or [""] for t in df["text"]]


def _gold_entities(df: pd.DataFrame) -> list[dict]:
    return [e for ws, ts in zip(df["tokens"], df["tags"]) for e in ner.entities(list(ws), list(ts))]


def _tagged_side(model, tok, sentences: list[list[str]], cfg: DriftConfig, bf16: bool, side: str) -> dict:
    from kftune.predict import sentence_embeddings, word_predictions
    from kftune.progress import Progress

    tags, scores = word_predictions(model, tok, sentences, cfg.batch_size, bf16)
    found = [e for ws, ts, ss in zip(sentences, tags, scores) for e in ner.entities(ws, ts, ss)]
    seqs = tok(sentences, is_split_into_words=True, truncation=True, max_length=tok.model_max_length)["input_ids"]
    emb = sentence_embeddings(model, seqs, tok.pad_token_id, cfg.batch_size, bf16,
                              Progress(f"drift: {side} sentences", len(seqs), "sentences"))
    return {"emb": emb, "pred": [e["type"] for e in found], "surfaces": [e["text"] for e in found],
            "conf": np.array([e["score"] for e in found]), "unk": _unk_rate(tok, seqs)}


def run_tagged_checks(champion_dir: str | Path, reference: pd.DataFrame, new: pd.DataFrame, cfg: DriftConfig,
                      bf16: bool = False) -> tuple[dict, dict]:
    """`run_checks` for a token-classification champion: the same tests on sentence embeddings and entities."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from kftune.predict import labels_of

    model = AutoModelForTokenClassification.from_pretrained(champion_dir)
    tok = AutoTokenizer.from_pretrained(champion_dir)
    types = sorted({t[2:] for t in labels_of(model) if t != "O"})
    held_out = _sample(reference[reference["split"] != "train"], cfg.max_rows, cfg.seed)
    new_s = _sample(new, cfg.max_rows, cfg.seed)
    sides = {side: _tagged_side(model, tok, _words(df), cfg, bf16, side) for side, df in (("reference", held_out),
                                                                                       ("new", new_s))}
    ref, nw = sides["reference"], sides["new"]
    train = reference[reference["split"] == "train"]
    known = {e["text"] for e in _gold_entities(train)}
    checks = [
        tests.mmd_test(ref["emb"], nw["emb"], cfg.permutations, cfg.alpha, cfg.seed),
        tests.distribution_test("prediction", ref["pred"], nw["pred"], types, cfg.psi_threshold, cfg.alpha),
        tests.confidence_test(ref["conf"], nw["conf"], cfg.alpha),
        tests.unseen_entity_test(known, ref["surfaces"], nw["surfaces"], cfg.unseen_entity_increase),
        tests.vocabulary_test(train["text"].tolist(), held_out["text"].tolist(), new_s["text"].tolist(),
                              cfg.oov_increase, (ref["unk"], nw["unk"])),
    ]
    if "tags" in new.columns:
        gold_ref, gold_new = [e["type"] for e in _gold_entities(reference)], [e["type"] for e in _gold_entities(new)]
        checks.append(tests.distribution_test("label", gold_ref, gold_new, sorted(set(types) | set(gold_new)),
                                              cfg.psi_threshold, cfg.alpha))
    return {c.method: c for c in checks}, sides


def retrain_decision(card: dict, drifted: bool | None, cfg: RetrainConfig, force: bool,
                     hours_since_promotion: float | None) -> tuple[str, str]:
    """Pure rule: (retrain | skip, why)."""
    if card["status"] == FIRST_TRAINING:
        return RETRAIN, "no champion yet: this is the first training"
    if card["status"] == NOTHING_NEW:
        return SKIP, "nothing new since the champion's data"
    n, split = card["new_rows"], card["new_rows_by_split"]
    if not split["train"] or split["test"] < cfg.min_new_test_rows:
        return SKIP, (f"{n} new rows give {split['train']} training and {split['test']} test rows; a challenger "
                      f"needs training rows and retrain.min_new_test_rows={cfg.min_new_test_rows} test rows to be "
                      f"compared on new data: waiting for more")
    train_labels = card["label_distribution"]["train"]
    if len(train_labels) < 2:
        return SKIP, (f"the challenger's training rows all have label {list(train_labels)}: waiting for more data "
                      f"(or raise retrain.replay_fraction)")
    if not force and hours_since_promotion is not None and hours_since_promotion < cfg.cooldown_hours:
        return SKIP, (f"cooldown: the last promotion was {hours_since_promotion:.1f} h ago, "
                      f"< retrain.cooldown_hours={cfg.cooldown_hours:g} (force to override)")
    reasons = ["forced"] if force else []
    if drifted:
        reasons.append("drift detected")
    if n >= cfg.min_new_rows:
        reasons.append(f"{n} new rows >= retrain.min_new_rows={cfg.min_new_rows}")
    if reasons:
        return RETRAIN, "; ".join(reasons)
    return SKIP, f"no drift, and {n} new rows < retrain.min_new_rows={cfg.min_new_rows}"


def hours_since_last_promotion(name: str, now: float) -> float | None:
    promotions = [e.time for e in registry.history(name) if e.action == "promote"]
    return (now - max(promotions)) / 3600 if promotions else None


def _bars(ax, ref: dict, new: dict, title: str) -> None:
    cats = list(ref)
    x = np.arange(len(cats))
    ax.bar(x - 0.2, [ref[c] for c in cats], 0.4, label="reference")
    ax.bar(x + 0.2, [new.get(c, 0.0) for c in cats], 0.4, label="new")
    ax.set_xticks(x, cats, rotation=30 if len(cats) > 4 else 0, ha="right" if len(cats) > 4 else "center")
    ax.set(title=title, ylabel="share")
    ax.legend()


def _plot(sides: dict, checks: dict, report: dict, path: Path) -> None:
    """Every test in one figure, the verdict and the decision in its title, and the table of tests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def title(method: str, text: str) -> str:
        return f"{text}{' - DRIFT' if checks[method].verdict else ''}"

    ref, new = sides["reference"], sides["new"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4))
    axes = axes.ravel()
    z = np.concatenate([ref["emb"], new["emb"]])
    z = z - z.mean(0)
    xy = z @ np.linalg.svd(z, full_matrices=False)[2][:2].T  # PCA to 2-D
    side = np.r_[np.zeros(len(ref["emb"])), np.ones(len(new["emb"]))]
    order = np.random.default_rng(0).permutation(len(xy))  # interleaved: neither side is painted over the other
    colors = np.array(["tab:blue", "tab:orange"])[side[order].astype(int)]
    axes[0].scatter(xy[order, 0], xy[order, 1], s=4, alpha=0.4, c=colors)
    for i, name in enumerate(sides):
        axes[0].scatter([], [], s=12, c=f"tab:{'blue' if i == 0 else 'orange'}", label=name)
    axes[0].set(title=title("embedding", f"embeddings (PCA); MMD p={checks['embedding'].p_value:.3g}"))
    axes[0].legend()
    pred = checks["prediction"].details
    what = "predicted entity types" if "entities" in checks else "predicted labels"
    _bars(axes[1], pred["reference"], pred["new"], title("prediction", f"{what}; PSI={checks['prediction'].score:.3f}"))
    low = min((c.min() for c in (ref["conf"], new["conf"]) if len(c)), default=0.0)  # a tagger may find no entity
    bins = np.linspace(min(low, 0.99), 1, 21)
    axes[2].hist([ref["conf"], new["conf"]], bins=bins, label=["reference", "new"], density=True)
    axes[2].set(title=title("confidence", f"confidence; KS p={checks['confidence'].p_value:.3g}"))
    axes[2].legend()
    shares = [("vocabulary", "unseen words", "reference_oov_rate", "new_oov_rate")]
    if "entities" in checks:
        shares.append(("entities", "unseen entity surfaces", "reference_unseen_share", "new_unseen_share"))
    for ax, (method, what, a, b) in zip(axes[3:5], shares):
        d = checks[method].details
        ax.bar(["reference", "new"], [d[a], d[b]], color=["tab:blue", "tab:orange"])
        ax.set(title=title(method, f"{what}: {checks[method].score:+.3f} (max +{checks[method].threshold:g})"),
               ylabel="share")
    if "label" in checks and len(shares) == 1:  # true labels of the new rows, where they have them
        d = checks["label"].details
        _bars(axes[4], d["reference"], d["new"], title("label", f"true labels; PSI={checks['label'].score:.3f}"))
    elif len(shares) == 1:
        axes[4].axis("off")
        axes[4].text(0.5, 0.5, "no true labels in the new rows", ha="center", va="center")
    axes[5].axis("off")
    rows = [[c.method, f"{c.score:.3g}", "" if c.p_value is None else f"{c.p_value:.3g}",
             "yes" if c.verdict else "no", "yes" if c.method in report["voting"] else "no"] for c in checks.values()]
    table = axes[5].table(cellText=rows, colLabels=["test", "score", "p", "flags", "votes"], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1, 1.6)
    verdict = {True: "DRIFT", False: "no drift", None: "not tested"}[report["drift"]]
    fig.suptitle(f"{verdict}: {len(report['flags'])} of the voting tests flagged ({report['min_flags']} needed); "
                 f"decision: {report['decision']} ({report['reason']})", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def vote(checks: dict, cfg: DriftConfig) -> tuple[list[str], list[str], int]:
    """(the methods of drift.methods that ran, those that flagged, how many must): min_flags counts among the
    tests that ran (a classifier has no entities test, live traffic no label test)."""
    voting = [m for m in cfg.methods if m in checks]
    return voting, [m for m in voting if checks[m].verdict], min(cfg.min_flags, len(voting)) or 1


def render_report(report: dict) -> str:
    from kftune.console import markdown_cell

    lines = [f"# Drift report: {report['decision']} ({markdown_cell(report['reason'])})", "",
             f"Champion v{report['champion_version'] or '-'}; {report['new_rows']} new rows."]
    if report["checks"]:
        lines += ["", f"Drift: **{'yes' if report['drift'] else 'no'}** ({len(report['flags'])} of the voting "
                      f"methods {report['voting']} flagged, {report['min_flags']} needed).", "",
                  "| method | score | threshold | p-value | drift |", "|---|---|---|---|---|"]
        for c in report["checks"].values():
            p = "" if c["p_value"] is None else f"{c['p_value']:.4g}"
            lines.append(f"| {c['method']} | {c['score']:.4g} | {c['rule']} | {p} | {'yes' if c['verdict'] else 'no'} |")
        lines += ["", "![drift](drift.png)"]
    return "\n".join(lines) + "\n"


def drift(data_dir: str | Path, champion_dir: str | Path, out_dir: str | Path, params: Params, force: bool = False,
          run_id: str = "", now: float | None = None) -> dict:
    """Run the drift tests and decide whether to train a challenger.

    Args:
        data_dir: resolve output (data_card.json, new.parquet).
        champion_dir: resolve's champion export (model, tokenizer, reference.parquet).
        out_dir: folder for drift.json, report.md and drift.png.
        params: all settings (drift, retrain, register.model_name).
        force: retrain even without drift, enough new rows, or past the cooldown.
        run_id: the retraining run in MLflow; every score and the decision are logged there.
        now: the current time (tests pass their own).

    Returns:
        The report; report["decision"] is retrain or skip.
    """
    data_dir = Path(data_dir)
    card = read_json(data_dir / "data_card.json")
    checks, sides = {}, None
    if card["status"] not in (FIRST_TRAINING, NOTHING_NEW):
        ref_path = Path(champion_dir) / "reference.parquet"
        if not ref_path.exists():
            raise FileNotFoundError(f"{ref_path}: the reference rows of champion v{card['champion_version']} are "
                                    f"missing from the resolve step's output")
        checks, sides = run_checks(champion_dir, pd.read_parquet(ref_path), pd.read_parquet(data_dir / "new.parquet"),
                                   params.drift, bf16_for(params.finetune))
    voting, flags, min_flags = vote(checks, params.drift)
    drifted = len(flags) >= min_flags if checks else None
    hours = hours_since_last_promotion(params.register.model_name, now or time.time())
    decision, reason = retrain_decision(card, drifted, params.retrain, force, hours)
    report = {"decision": decision, "reason": reason, "drift": drifted, "flags": flags, "voting": voting,
              "min_flags": min_flags, "champion_version": card["champion_version"],
              "new_rows": card["new_rows"], "hours_since_promotion": hours, "forced": force,
              "checks": {m: c.to_dict() for m, c in checks.items()}}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "drift.json", report)
        (tmp / "report.md").write_text(render_report(report), encoding="utf-8")
        if sides:
            _plot(sides, checks, report, tmp / "drift.png")
    if run_id:
        _log(run_id, report, Path(out_dir))
        if decision != "retrain":  # the last step of this retraining run
            from kftune.tracking import finish_run

            finish_run(run_id)
    log.info("drift: %s (%s); flags %s", decision, reason, flags)
    return report


def _log(run_id: str, report: dict, out_dir: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    metrics = {}
    for m, c in report["checks"].items():
        metrics[f"drift_{m}_score"] = c["score"]
        metrics[f"drift_{m}_flag"] = float(c["verdict"])
        if c["p_value"] is not None:
            metrics[f"drift_{m}_p_value"] = c["p_value"]
    metrics["drift_flags"] = float(len(report["flags"]))
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    for k, v in {"drift": "n/a" if report["drift"] is None else str(report["drift"]).lower(), "retrain_decision": report["decision"],
                 "retrain_reason": report["reason"]}.items():
        client.set_tag(run_id, f"kftune.{k}", v)
    for f in out_dir.iterdir():
        client.log_artifact(run_id, str(f), "drift")
