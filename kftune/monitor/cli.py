"""`kftune monitor`, `kftune feedback`, `kftune label` and `kftune demo-loop`: thin adapters onto kftune.monitor."""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from pathlib import Path

from kftune.config import ConfigError, load_params


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--log-dir", help="the request log (default: serve.log_dir)")


def _setup(args):
    from kftune.tracking import configure

    params = load_params(args.params, args.set or [])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure(args.project_dir)
    log_dir = args.log_dir or params.serve.log_dir
    if not log_dir:
        raise ConfigError("no request log: serve.log_dir is empty and --log-dir was not given")
    return params, log_dir


def _time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--now {text!r}: expected Unix seconds or an ISO time like 2026-01-31T12:00") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def describe_check(c: dict) -> str:
    from kftune.console import plain

    failing = [r["name"] for r in c["rules"] if r["status"] == "failing"]
    live = c["live"]
    parts = [f"check {c['check']} at {c['now'][:19]}: {c['model']} v{c['version'] or '-'}, {c['requests']} predictions "
             f"since the last check, {c['new_requests']} new for the drift tests",
             f"drift: {'yes' if c['drifted'] else 'no' if c['drifted'] is not None else 'not run'} ({c['drift_why']})",
             f"alerts failing: {', '.join(failing) or 'none'}"]
    parts += [f"rule {r} cannot fire: {why}" for r, why in c.get("cannot_fire", {}).items()]
    if live.get("n"):
        parts.append(f"live accuracy {live['accuracy']:.3f} [{live['accuracy_low']:.3f}, {live['accuracy_high']:.3f}] "
                     f"on {live['n']} random-sample labels (test {c['test_accuracy'] or 0:.3f})")
    parts += [f"ALERT {e['alert']} {e['status']}: {e['why']}" for e in c["events"]]
    log_ = c.get("log", {})
    if log_.get("compacted") or log_.get("deleted"):
        parts.append("request log: {compacted} day(s) compacted from {files} file(s), {deleted} day(s) past "
                     "monitor.log_retention_days deleted".format(**log_))
    parts += [f"request log: day {why} (left as it was; the next check tries again)" for why in log_.get("failed", [])]
    return plain("\n  ".join(parts))


def monitor_job(params, log_dir: str, project_dir: str | Path, now: float | None = None, out: str | None = None):
    """One monitoring check as a callable: `kftune monitor`, its --cron loop and `kftune schedule --monitor`."""
    from kftune.monitor.check import monitor_once

    cache = Path(project_dir) / ".kftune" / "monitor"

    def job():
        c = monitor_once(log_dir, params, now, cache, out)
        print(describe_check(c), flush=True)
        return f"monitor check {c['check']}: {len(c['events'])} alert event(s)"
    return job


def cmd_monitor(args) -> int:
    params, log_dir = _setup(args)
    params.monitor.check_webhook()  # at once, not at the first fire time
    job = monitor_job(params, log_dir, args.project_dir, _time(args.now), args.out)
    if not args.cron:
        job()
        return 0
    from kftune import schedule

    try:
        schedule.run_schedule(schedule.check_cron(args.cron), job, Path(args.project_dir) / ".kftune" / "monitor.lock")
    except KeyboardInterrupt:
        print("\nmonitor schedule stopped", flush=True)
    return 0


def cmd_feedback(args) -> int:
    from kftune import registry
    from kftune.monitor.feedback import import_feedback
    from kftune.monitor.labels import _champion

    params, log_dir = _setup(args)
    labels = None
    if registry.version_by_alias(params.register.model_name, registry.CHAMPION):
        labels = _champion(params, Path(args.project_dir) / ".kftune" / "monitor")[3]["labels"]
    n = import_feedback(args.file, log_dir, labels, args.labeller or "", params.register.model_name)
    print(f"stored {n} correction(s) beside the request log in {log_dir}")
    return 0


def cmd_label(args) -> int:
    from kftune.console import plain
    from kftune.monitor.labels import import_labels, queue

    params, log_dir = _setup(args)
    cache = Path(args.project_dir) / ".kftune" / "monitor"
    if args.action == "queue":
        since = datetime.fromtimestamp(_time(args.since), timezone.utc) if args.since else None
        q = queue(log_dir, params, args.n, args.out, since, cache)
        print(f"labelling queue of {q['rows']} texts from {q['candidates']} unlabelled predictions of v{q['version']}: "
              + ", ".join(f"{k} {v}" for k, v in q["by_sample"].items()))
        print(f"  {q['out_dir']}/queue.csv (fill in `label`), queue-labelstudio.json + label-config.xml "
              f"(Label Studio); labels: {', '.join(q['labels'])}")
        print("  only the `random` rows (unbiased=True) estimate live accuracy; the others were chosen for being "
              "hard or drifted")
        return 0
    if not args.file:
        raise ConfigError("label import needs FILE (a filled queue.csv or a Label Studio JSON export)")
    out = import_labels(args.file, params, args.project_dir, log_dir, args.labeller or "", args.tag,
                        push=not args.no_push, cache_dir=cache)
    skipped = f"{out['dropped_existing']} already in the dataset, {out['unlabelled']} unlabelled, skipped"
    if out["commit"]:
        print(plain(f"added {out['added']} labelled texts as {', '.join(out['files'])} -> commit {out['commit'][:10]} "
                    f"({skipped})"))
    else:
        print(f"nothing new for the dataset ({skipped})")
    if log_dir:
        print(f"feedback stored for {out['feedback']} logged predictions"
              + (f"; {out['feedback_unmatched']} rows name no prediction of {params.register.model_name} in "
                 f"{log_dir}" if out["feedback_unmatched"] else ""))
    if out["commit"]:
        print("the retraining pipeline reads them as new rows: kftune retrain")
    return 0


def cmd_demo_loop(args) -> int:
    from kftune.demo.loop import run_loop

    run_loop(args.workdir, args.params, args.set or [], fast=args.fast)
    return 0


def add_commands(sub) -> None:
    """Register `monitor`, `feedback`, `label` and `demo-loop` on the kftune command's subparsers."""
    p = sub.add_parser("monitor", help="one monitoring check of the served champion's traffic (drift tests, alert "
                                       "rules, MLflow run); --cron repeats it")
    p.add_argument("--now", help="the check's time (Unix seconds or ISO; default: the clock) for replayed traffic")
    p.add_argument("--out", help="also write report.md, monitor.png and check.json into this folder")
    p.add_argument("--cron", help="run a check at every fire time of this 5-field cron, e.g. '*/15 * * * *'")
    _params_args(p)
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("feedback", help="bulk corrections of logged predictions, stored beside the request log")
    p.add_argument("action", choices=["import"])
    p.add_argument("file", help="CSV or JSONL with request_id, label and optionally index, labeller")
    p.add_argument("--labeller", help="who labelled (when the file has no labeller column)")
    _params_args(p)
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("label", help="labelling queue from live traffic, and labels back in as a new data version")
    p.add_argument("action", choices=["queue", "import"])
    p.add_argument("file", nargs="?", help="import: a filled queue.csv or a Label Studio JSON export")
    p.add_argument("--n", type=int, default=200, help="queue: texts to pick (default: %(default)s)")
    p.add_argument("--out", default="labelling", help="queue: output folder (default: %(default)s)")
    p.add_argument("--since", help="queue: only predictions since this time (Unix seconds or ISO)")
    p.add_argument("--labeller", help="import: who labelled (when the file does not say)")
    p.add_argument("--tag", help="import: git tag for the new data version")
    p.add_argument("--no-push", action="store_true", help="import: do not `dvc push`")
    _params_args(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("demo-loop", help="the whole loop on replayed demo traffic: serve, drift, alerts, labels, "
                                         "retraining, swap")
    p.add_argument("--workdir", default=".kftune/demo-loop", help="scratch project (recreated; default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="small batches and few steps (the CI variant)")
    p.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.set_defaults(func=cmd_demo_loop)
