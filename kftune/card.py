"""The model card: what a registered version is, how good it is, why the gate decided what it did.

It is the version's description in the MLflow registry (the first thing its page shows) and, shorter,
the description of the run that trained it. Pure functions of the step outputs, so a test can read one.
"""

from __future__ import annotations

from kftune.console import code_span, markdown_cell
from kftune.metrics import score_cells, unscored


def _score_rows(metrics: dict, verdict) -> list[str]:
    primary = metrics["primary"]
    keys = [k for k in ("accuracy", "macro_f1", "ece", "entity_f1", "precision", "recall", "token_accuracy")
            if k in metrics["model"]]
    rows = [("**this version**", metrics["model"])] + [(f"{b} baseline", m) for b, m in metrics["baselines"].items()]
    lines = ["| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |" for name, m in rows]
    if verdict.champion_version and verdict.champion_score is not None:
        cells = [f"{verdict.champion_score:.4f}" if k == primary else "" for k in keys]
        lines.append(f"| champion v{verdict.champion_version} (re-scored now) | " + " | ".join(cells) + " |")
        if verdict.unseen_rows is not None:
            cells = [f"{verdict.challenger_unseen_score:.4f}" if k == primary else "" for k in keys]
            lines[-1] = lines[-1].replace("(re-scored now)", f"(re-scored now, on the {verdict.unseen_rows} rows "
                                                              f"it never trained on)")
            lines.append(f"| **this version**, on the same {verdict.unseen_rows} rows | " + " | ".join(cells) + " |")
    return lines


def _compared(verdict) -> tuple[float, str]:
    """The challenger's score the gate compared with the reference, and on which rows."""
    if verdict.unseen_rows is not None and verdict.champion_score is not None:
        return verdict.challenger_unseen_score, f" on the {verdict.unseen_rows} test rows the champion never trained on"
    return verdict.challenger_score, ""


LABEL_ROWS = 20  # more labels (150 intents): the weakest this many, so the card keeps its later sections


def _per_class_rows(metrics: dict) -> list[str]:
    per = metrics["model"].get("per_class") or metrics["model"].get("per_type", {})
    shown = per if len(per) <= LABEL_ROWS else dict(sorted(  # no test rows and never predicted: nothing to show
        ((lbl, c) for lbl, c in per.items() if not unscored(c)), key=lambda kv: kv[1]["f1"])[:LABEL_ROWS])
    lines = ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {markdown_cell(lbl)} | {score_cells(c)} | {c['support']} |" for lbl, c in shown.items()]
    if len(shown) < len(per):
        idle = sum(unscored(c) for c in per.values())
        lines += ["", f"The {len(shown)} weakest of {len(per) - idle} scored labels"
                      + (f" ({idle} more had no test rows and no predictions)" if idle else "")
                      + "; all of them are in the run's `evaluation/report.html`."]
    return lines


def _labels(labels: list[str]) -> str:
    more = f", ... ({len(labels)} in all)" if len(labels) > LABEL_ROWS else ""
    return ", ".join(markdown_cell(lbl) for lbl in labels[:LABEL_ROWS]) + more


def _data_lines(card: dict) -> list[str]:
    lineage = card.get("lineage", {})
    where = lineage.get("data_path", "?")
    if lineage.get("data_commit"):
        where += f" at {lineage.get('data_repo') or 'this repo'}@{lineage['data_commit'][:10]}"
    rows = card.get("rows", {})
    lines = [f"- source: `{code_span(where)}`", f"- content sha256: `{card.get('sha256', '?')[:16]}`",
             "- rows: " + ", ".join(f"{s} {n}" for s, n in rows.items())]
    if "new_rows" in card:
        lines.append(f"- retraining: {card['new_rows']} new rows, {card.get('replayed_rows', 0)} replayed")
    return lines


def _limits(metrics: dict, card: dict) -> list[str]:
    per = metrics["model"].get("per_class") or metrics["model"].get("per_type", {})
    per = {k: v for k, v in per.items() if v.get("support", 1)}  # a label with no test example has no F1
    out = []
    if per:
        worst, c = min(per.items(), key=lambda kv: kv[1]["f1"])
        out.append(f"- weakest label: {markdown_cell(worst)} (F1 {c['f1']:.4f}, {c['support']} test examples)")
    out.append(f"- measured on {metrics['test_rows']} test rows of one data version; texts unlike them "
               f"(another domain, language or period) are not covered by these numbers")
    if "ece" in metrics["model"]:
        out.append(f"- calibration error (ECE) {metrics['model']['ece']:.4f}: confidences are "
                   f"{'roughly' if metrics['model']['ece'] < 0.05 else 'not'} usable as probabilities")
    return out


def model_card(name: str, version: str, base_model: str, card: dict, metrics: dict, verdict, git_commit: str,
               run_id: str) -> str:
    """Markdown for the registry version's description.

    Args:
        name, version: the registered model and its new version.
        base_model: model.name the fine-tune started from.
        card: ingest's data_card.json (lineage, rows, sha256).
        metrics: evaluate's evaluation.json (model, baselines, per-class, primary, baseline).
        verdict: the gate's kftune.gate.Verdict, after judge().
        git_commit: the code version; run_id: the MLflow run that holds the artifacts.
    """
    primary, task = metrics["primary"], card.get("task", "sequence-classification")
    # the score the gate compared with: the champion's when it could be scored, else the baseline's
    against = f"champion v{verdict.champion_version}" if verdict.champion_score is not None else \
        f"the {metrics['baseline']} baseline"
    mine, rows = _compared(verdict)
    lines = [f"# {name} v{version}", "",
             f"A {task.replace('-', ' ')} model fine-tuned from `{code_span(base_model)}` by kftune; "
             f"labels: {_labels(metrics['labels'])}.", "",
             f"**Gate: {verdict.decision}** — test {primary} {mine:.4f} against {against} "
             f"{verdict.reference_score:.4f}{rows}.", "", "## Why", ""]
    lines += [f"- {markdown_cell(r)}" for r in verdict.reasons]
    lines += ["", f"## Test split ({metrics['test_rows']} rows)", "", *_score_rows(metrics, verdict), "",
              *_per_class_rows(metrics)]
    if metrics.get("historical"):
        lines += ["", f"Frozen historical test split ({metrics['historical_rows']} rows): {primary} "
                      f"{metrics['historical'][primary]:.4f}"
                      + (f", champion {verdict.champion_historical_score:.4f}"
                         if verdict.champion_historical_score is not None else "") + "."]
    lines += ["", "## Data", "", *_data_lines(card), "", "## Reproduce", "", "```",
              f"kftune models show {version} --name {name}   # the exact commands: code, data and settings",
              f"mlflow artifacts download --run-id {run_id} --artifact-path params.yaml --dst-path .",
              "```", f"Code `{git_commit}`, MLflow run `{run_id}`; the evaluation report is the run's "
              f"`evaluation/report.html`.", "", "## Known limits", "", *_limits(metrics, card)]
    return "\n".join(lines) + "\n"


def run_description(version: str, name: str, metrics: dict, verdict) -> str:
    """The run's description (MLflow's mlflow.note.content): one paragraph, the card's headline."""
    primary = metrics["primary"]
    base = metrics["baselines"][metrics["baseline"]][primary]
    mine, rows = _compared(verdict)
    champion = (f", champion v{verdict.champion_version} {verdict.champion_score:.4f}"
                + (f" against this version's {mine:.4f}{rows}" if rows else "")
                if verdict.champion_version and verdict.champion_score is not None else "")
    return (f"Registered {name} v{version}; gate: **{verdict.decision}**. Test {primary} "
            f"{verdict.challenger_score:.4f} ({metrics['baseline']} baseline {base:.4f}{champion}). "
            f"The model card is the description of {name} v{version} in the registry.")


DESCRIPTION_LIMIT = 5000  # a model version's description column in MLflow's SQL stores


def publish(name: str, version: str, run_id: str, base_model: str, card: dict, metrics: dict, verdict,
            git_commit: str) -> str:
    """Write the model card as the version's description and the headline as the run's; returns the card."""
    from mlflow import MlflowClient

    text = model_card(name, version, base_model, card, metrics, verdict, git_commit, run_id)
    if len(text) > DESCRIPTION_LIMIT:  # many labels: the per-class table is in the run's evaluation report
        text = text[: DESCRIPTION_LIMIT - 80].rsplit("\n", 1)[0] + "\n\n(cut at MLflow's limit; see the run's report)\n"
    client = MlflowClient()
    client.update_model_version(name, version, description=text)
    client.set_tag(run_id, "mlflow.note.content", run_description(version, name, metrics, verdict))
    return text
