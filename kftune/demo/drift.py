"""The drift demo: a scratch DVC project fed the synthetic generator's batches, one retraining after each.

Batches 0-2 come from the same distribution, batch 3 is shifted (new sectors and jargon, mostly
negative news). Expected: batch 0 trains the first champion, batches 1 and 2 are not drift and do
not retrain, batch 3 is drift, retrains, and the champion moves because it is better on the new
batch without forgetting the old ones.

With task=token-classification the batches are tagged sentences (kftune.demo.data.generate_tagged):
batch 3 brings new people, organisations and places in a chat-style context, and the F1 is entity F1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kftune.config import Params

BATCHES = ((0, 0.0), (1, 0.0), (2, 0.0), (3, 1.0))  # (batch number, drift)
# Retrain on drift only (not on row count), and let batch 3 retrain minutes after batch 0's promotion.
OVERRIDES = ["retrain.cooldown_hours=0", "retrain.min_new_rows=1000000"]


def setup_project(workdir: Path) -> None:
    """A fresh git + DVC repository with a local DVC remote."""
    from kftune.data import _dvc, _git

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    _git(workdir, "init", "-q", "-b", "main")
    for key, value in (("user.email", "demo@kftune.local"), ("user.name", "kftune demo")):
        _git(workdir, "config", key, value)
    _dvc(workdir, "init", "-q")
    _dvc(workdir, "remote", "add", "-d", "local", str(workdir / ".dvc-storage"))
    _git(workdir, "commit", "-qm", "dvc init")


def tagged(params: Params) -> bool:
    return params.task == "token-classification"


def champion_f1(params: Params, rows) -> float | None:
    """Macro-F1 (tagged sentences: entity F1) of the current champion on labelled rows, or None without one."""
    from kftune import registry
    from kftune.demo.data import LABELS, TAGS
    from kftune.gate import score_version

    name = params.register.model_name
    version = registry.version_by_alias(name, registry.CHAMPION)
    if version is None:
        return None
    labels = list(TAGS if tagged(params) else LABELS)
    return score_version(f"models:/{name}/{version}", {"batch": rows}, labels, params)["batch"]


def held_out(path: Path, params: Params):
    """The batch's rows that fall in the test split: never trained on by any version."""
    from kftune.tables import load_rows, load_sentences

    df, _ = (load_sentences if tagged(params) else load_rows)(str(path), params.ingest)
    return df[df["split"] == "test"]


def run_drift_demo(workdir: str | Path, params: Params, rows: int, echo=print, batches=BATCHES) -> list[dict]:
    """Feed `batches` ((number, drift) pairs) through `kftune data add` + the retraining pipeline; return (and
    print) the timeline."""
    from kftune.data import add_batches
    from kftune.demo.data import write_batch, write_tagged_batch
    from kftune.local import describe_outcome, run_retraining_local
    from kftune.tracking import configure, git_commit

    workdir = Path(workdir).resolve()
    setup_project(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"  # the demo's own store, always
    os.environ.setdefault("KFTUNE_GIT_COMMIT", git_commit(Path(__file__).parent))  # the code's commit, not the demo's
    configure(workdir)
    echo(f"demo project: {workdir} (git + DVC, MLflow in mlflow.db); {params.task}; settings: {' '.join(OVERRIDES)}")
    timeline, write = [], write_tagged_batch if tagged(params) else write_batch
    for batch, drift in batches:
        path = write(workdir.parent / f"{workdir.name}-incoming", batch, rows, drift=drift)
        added = add_batches([str(path)], workdir, params.ingest, tag=f"batch-{batch}", task=params.task)
        test = held_out(path, params)
        before = champion_f1(params, test)
        echo(f"\n== batch {batch} (drift {drift}): {sum(added['rows'].values())} rows -> commit "
             f"{added['commit'][:8]}; retraining...")
        o = run_retraining_local(params, workdir)
        after = champion_f1(params, test)
        row = {"batch": batch, "shift": drift, **o, "batch_test_rows": len(test), "champion_f1_before": before,
               "champion_f1_after": after}
        timeline.append(row)
        metric = "entity F1" if tagged(params) else "macro-F1"
        echo(f"batch {batch}: {describe_outcome(o)}; its {metric} on the batch {_f(before)} -> {_f(after)}")
    (workdir / "timeline.json").write_text(json.dumps(timeline, indent=2, default=str), encoding="utf-8")
    echo("\n" + format_timeline(timeline, tagged(params)))
    return timeline


def _f(x, spec=".3f") -> str:
    return "-" if x is None or x == "" else format(float(x), spec)


def format_timeline(rows: list[dict], tagged_text: bool = False) -> str:
    """Tagged text adds the rise in unseen entity names (ENT+) and reads F1 as entity F1."""
    ent = f" {'ENT+':>6}" if tagged_text else ""
    head = f"{'batch':>5} {'shift':>5} {'new':>5} {'drift':>5} {'MMD p':>6} {'PSI':>6} {'OOV+':>6}{ent}  " \
           f"{'decision':<24} {'champion':>8}  {'F1 before':>9} {'F1 after':>8}"
    metric = "entity F1" if tagged_text else "macro-F1"
    lines = [f"timeline (F1: the champion's {metric} on the batch's test rows, before and after its retraining run"
             + ("; PSI: gold entity types; ENT+: rise in the share of predicted entities never seen in training)"
                if tagged_text else ")"), head, "-" * len(head)]
    for r in rows:
        s = r["drift_scores"]
        outcome = r["retrain"] + (f" v{r['challenger_version']} {r['decision']}" if r["challenger_version"] else "")
        ent_cell = f" {_f(s.get('entities_score')):>6}" if tagged_text else ""
        lines.append(f"{r['batch']:>5} {r['shift']:>5.1f} {r['new_rows']:>5} {r['drift'] or '-':>5} "
                     f"{_f(s.get('embedding_p_value')):>6} {_f(s.get('label_score')):>6} "
                     f"{_f(s.get('vocabulary_score')):>6}{ent_cell}  "
                     f"{outcome:<24} {'v' + (r['champion'] or '-'):>8}  "
                     f"{_f(r['champion_f1_before']):>9} {_f(r['champion_f1_after']):>8}")
    return "\n".join(lines)
