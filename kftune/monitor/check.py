"""One monitoring check: the request log since the watermark against the champion's held-out reference.

State (`<log_dir>/_monitor/state.json`, written whole): the watermark (the newest prediction the drift
tests have consumed), each alert rule's state, the champion's reference statistics per version, and
the history of checks the report draws. The drift tests run only once `monitor.min_requests`
predictions of the champion have arrived since the watermark; until then the watermark stays and
the rows accumulate. Rows younger than 2 × `serve.log_flush_seconds` wait for the next check: a replica
sharing the log may not have written its rows of that time yet. Alert rules are judged on every check, each
over its own window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import socket
import tempfile
import time
from pathlib import Path

import pandas as pd

from kftune.config import Params
from kftune.fileio import s3_lease, single_instance, write_json
from kftune.monitor import rules as R
from kftune.serving.request_log import _fs, _is_local, compact_request_log, read_request_log

log = logging.getLogger(__name__)

STATE = "_monitor/state.json"
CHECK_LOG = "kftune.check_log"  # a digest naming the request log a check run read (log_key)


def load_state(log_dir: str) -> dict:
    fs, root = _fs(log_dir)
    path = f"{root}/{STATE}"
    if not fs.exists(path):
        return {"watermark": None, "checks": 0, "alerts": {}, "reference": {}, "history": []}
    with fs.open(path, "r") as f:
        return json.load(f)


def save_state(log_dir: str, state: dict) -> None:
    """Written whole or not at all: locally by write_json; on an object store in one put (a file object's close
    would upload what was written before an error)."""
    fs, root = _fs(log_dir)
    if _is_local(fs):
        Path(root, STATE).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(root, STATE), state, sort_keys=False)
    else:
        fs.pipe_file(f"{root}/{STATE}", json.dumps(state, indent=1, default=str).encode())


@contextlib.contextmanager
def one_check_at_a_time(log_dir: str):
    """Checks of one log wait for each other (a one-off `kftune monitor` beside `monitor --cron`, or beside the
    cluster's recurring run): two at once would both send an alert's change and one would lose the other's state.
    A local log: a file lock; on S3: a lease object (fileio.s3_lease). Other object stores: one check per log is
    the scheduler's job (the monitoring pipeline's recurring run). Yields whether this check excludes the others."""
    fs, root = _fs(log_dir)
    if _is_local(fs):
        with single_instance(Path(root, "_monitor", ".check.lock"), "monitoring check", wait=True):
            yield True
    elif "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        with s3_lease(fs, f"{root}/_monitor/check.lease", "monitoring check") as held:
            yield held
    else:
        yield False


def log_key(log_dir: str) -> str:
    """What names one request log in its checks' runs (tag CHECK_LOG): a digest of its host and path where it is a
    local folder (the lock is per machine), of its URL on an object store."""
    fs, root = _fs(log_dir)
    where = f"{socket.gethostname()}:{Path(root).resolve()}" if _is_local(fs) else fs.unstrip_protocol(root)
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def champion_files(name: str, version: str, cache: Path) -> tuple[Path, pd.DataFrame, dict]:
    """The champion's model folder and reference rows, exported once per version into `cache`."""
    from kftune.steps.resolve import download_reference, export_champion

    folder = cache / f"{name}-v{version}"
    if not (folder / "reference.parquet").exists():
        import shutil

        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".export-"))
        try:
            export_champion(name, version, tmp / "model")
            rows, card = download_reference(name, version, tmp / "ref")
            rows.to_parquet(tmp / "model" / "reference.parquet")
            (tmp / "model" / "card.json").write_text(json.dumps(card, default=str), encoding="utf-8")
            try:  # whole, by one rename; a folder another process (a label import, a check) finished first is
                (tmp / "model").rename(folder)  # theirs, and it may be reading it: this copy goes instead
            except OSError:
                if not (folder / "reference.parquet").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, pd.read_parquet(folder / "reference.parquet"), json.loads((folder / "card.json").read_text())


def test_scores(name: str, version: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    m = client.get_run(client.get_model_version(name, version).run_id).data.metrics
    return {k.removeprefix("test_"): v for k, v in m.items() if k in ("test_accuracy", "test_macro_f1")}


def run_drift(folder: Path, reference: pd.DataFrame, new: pd.DataFrame,
              params: Params) -> tuple[dict, bool | None, str]:
    """The drift step's label-free tests with its seeds, thresholds and vote (None: no voting test applies)."""
    from kftune.hardware import bf16_for
    from kftune.steps.drift import run_checks, vote

    checks, _ = run_checks(folder, reference, new[["text"]], params.drift, bf16_for(params.finetune))
    voting, flags, need = vote(checks, params.drift)
    found = {m: c.to_dict() for m, c in checks.items()}
    if not voting:  # drift.methods has only tests that need labels: live traffic has none
        return found, None, f"none of drift.methods {params.drift.methods} runs on unlabelled traffic"
    why = (f"drift tests on {len(new)} predictions: {len(flags)} of {voting} flagged ({', '.join(flags) or 'none'}), "
           f"{need} needed")
    return found, len(flags) >= need, why


def monitor_once(log_dir: str, params: Params, now: float | None = None, cache_dir: str | Path = ".kftune/monitor",
                 out_dir: str | Path | None = None, sleep=time.sleep) -> dict:
    """One check (after any other check of the same local log has finished). Args:
        log_dir: the server's request log (serve.log_dir).
        params: all settings (monitor, drift, register.model_name).
        now: the check's time in Unix seconds (default: the clock; a replay passes its simulated time).
        cache_dir: where champion exports are kept between checks.
        out_dir: where report.md and monitor.png are written (default: a temp folder, logged to MLflow).
    Returns the check's record (also logged as one MLflow run).
    """
    with one_check_at_a_time(log_dir) as alone:
        return _check(log_dir, params, now, cache_dir, out_dir, sleep, alone)


def _check(log_dir: str, params: Params, now: float | None, cache_dir: str | Path, out_dir: str | Path | None,
           sleep, alone: bool) -> dict:
    import mlflow

    from kftune import registry
    from kftune.monitor.feedback import joined, live_quality, read_feedback
    from kftune.monitor.sinks import deliver
    from kftune.tracking import close_running, experiment_id, fail_run, finish_run, owner_tags

    cfg, name = params.monitor, params.register.model_name
    cfg.check_webhook()  # before the check: its alerts must have somewhere to go
    now_ts = pd.Timestamp(now if now is not None else time.time(), unit="s", tz="UTC")
    state = load_state(log_dir)
    version = registry.version_by_alias(name, registry.CHAMPION)
    watermark = pd.Timestamp(state["watermark"]) if state["watermark"] else None
    rules = cfg.parsed_rules()
    horizon = now_ts - pd.Timedelta(seconds=max([r.window for r in rules] + [3600]))
    since = min(horizon, watermark) if watermark is not None else None
    logged = read_request_log(log_dir, since=since.to_pydatetime() if since is not None else None)
    # a prediction: a label (classifier) or entities (tagger)
    logged = logged[(logged["model"] == name) & (logged["time"] <= now_ts)
                    & (logged["label"].notna() | logged["entities"].notna())]
    served = logged[logged["version"] == version] if version else logged.iloc[:0]
    # the drift tests take rows older than two flush intervals only: another replica may still hold younger
    # ones, and a row written after the watermark passed its time would never be tested
    settled = served[served["time"] <= now_ts - pd.Timedelta(seconds=2 * params.serve.log_flush_seconds)]
    new = settled if watermark is None else settled[settled["time"] > watermark]
    previous = pd.Timestamp(state["history"][-1]["now"]) if state["history"] else None
    interval = logged if previous is None else logged[logged["time"] > previous]

    drift, drifted, why, test = {}, None, f"{len(new)} new predictions of the champion, drift tests need " \
                                          f"monitor.min_requests={cfg.min_requests}", {}
    ref_stats = state["reference"].get(version or "", {})
    if version:
        folder, reference, card = champion_files(name, version, Path(cache_dir))
        test = test_scores(name, version)
        if len(new) >= cfg.min_requests:  # the reference shares and confidence are the champion's predictions
            drift, drifted, why = run_drift(folder, reference, new, params)
            ref_stats["shares"] = drift["prediction"]["details"]["reference"]
            ref_stats["confidence"] = drift["confidence"]["details"]["reference_mean"]
            state["watermark"] = str(new["time"].max())
        state["reference"][version] = ref_stats

    # each correction to its own prediction over all that was read, any version: a client may reuse a request id
    corrected = joined(logged, read_feedback(log_dir))
    corrected = corrected[corrected["version"] == version] if version else corrected.iloc[:0]
    labels = list(served["labels"].iloc[0]) if len(served) else []

    def live_in(seconds: float | None) -> dict:  # seconds None: all of the champion's predictions read
        labelled = R.window(corrected, now_ts, seconds) if seconds else corrected
        return live_quality(labelled, labels, cfg.confidence_level) if len(labelled) else {"n": 0}

    lives = {w: live_in(w) for w in {r.window for r in rules if r.kind == "live_quality"}}  # one per window
    live = lives[max(lives)] if lives else live_in(None)
    state["seen_traffic"] = bool(state.get("seen_traffic") or len(logged)
                                 or any(h.get("requests") for h in state["history"]))  # older state files
    ctx = R.Context(ref_stats.get("shares", {}), ref_stats.get("confidence"), drifted, why, live,
                    test.get("accuracy"), ever_traffic=state["seen_traffic"],
                    labels=tuple(card.get("labels") or ()) if version else ())
    cannot = {r.name: why_not for r in rules if (why_not := R.cannot_fire(r, ctx.labels))}
    for rule_name, why_not in cannot.items():
        log.warning("monitor rule %s: %s (monitor.rules in params.yaml)", rule_name, why_not)
    # volume counts every version's predictions: a server that has not swapped to a new champion yet still serves
    verdicts = [R.judge(r, logged if r.kind == "volume" else served, now_ts,
                        dataclasses.replace(ctx, live=lives[r.window]) if r.kind == "live_quality" else ctx)
                for r in rules]
    state["alerts"], events = R.transitions(verdicts, state["alerts"], str(now_ts))

    client, key = mlflow.MlflowClient(), log_key(log_dir)
    if alone:  # no live check of this log can own a RUNNING run of it: an earlier check's process was stopped
        close_running(client, CHECK_LOG, key, "an earlier check of this request log (owner {owner}) did not finish: "
                                              "its process stopped; the next check closed it")
    run = client.create_run(experiment_id(cfg.experiment), run_name=f"check {now_ts:%Y-%m-%d %H:%M}",
                            tags={"kftune.model_name": name, "kftune.champion_version": version or "",
                                  "kftune.check_time": str(now_ts), CHECK_LOG: key, **owner_tags()})
    run_id = run.info.run_id
    try:
        events = deliver(events, cfg, run_id if "mlflow" in cfg.sinks else "", sleep)
        state["checks"] += 1
        point = {"now": str(now_ts), "version": version, "requests": len(interval), "new_requests": len(new),
                 "shares": interval["label"].value_counts(normalize=True).to_dict() if len(interval) else {},
                 "confidence": float(interval["probability"].mean()) if interval["probability"].notna().any() else None,
                 "embedding_p": drift.get("embedding", {}).get("p_value"),
                 "confidence_p": drift.get("confidence", {}).get("p_value"), "drifted": drifted,
                 "live_accuracy": live.get("accuracy"), "live_accuracy_low": live.get("accuracy_low"),
                 "live_accuracy_high": live.get("accuracy_high"), "live_n": live.get("n", 0),
                 "alerts": {v.rule.name: state["alerts"].get(v.rule.name, {}).get("status", R.OK) for v in verdicts},
                 "events": [f"{e['alert']} {e['status']}" for e in events]}
        state["history"] = (state["history"] + [point])[-cfg.history:]
        check = {"model": name, "version": version, "now": str(now_ts), "run_id": run_id, "check": state["checks"],
                 "watermark_before": str(watermark) if watermark is not None else None,
                 "watermark": state["watermark"], "new_requests": len(new), "requests": len(interval), "drift": drift,
                 "drifted": drifted, "drift_why": why,
                 "rules": [{"name": v.rule.name, "kind": v.rule.kind, "status": v.status, "value": v.value,
                            "requests": v.requests, "why": v.why} for v in verdicts],
                 "events": events, "live": live, "test_accuracy": test.get("accuracy"), "point": point,
                 "cannot_fire": cannot}
        save_state(log_dir, state)  # first: the alerts went out, a failure below must not send them again
        try:  # after the check: housekeeping never delays an alert
            check["log"] = compact_request_log(log_dir, now_ts.timestamp(), cfg.log_retention_days)
        except Exception as exc:  # noqa: BLE001 - the next check tries again
            log.warning("request log %s: compaction failed (next check tries again): %s: %s", log_dir,
                        type(exc).__name__, exc)
        _log_run(client, run_id, check, state["history"], out_dir, int(now_ts.timestamp() * 1000))
    except BaseException as exc:  # the run ends with the check, whatever stops it here
        fail_run(run_id, f"{type(exc).__name__}: {exc}")
        raise
    finish_run(run_id)
    return check


def _log_run(client, run_id: str, check: dict, history: list[dict], out_dir, ts: int) -> None:
    from mlflow.entities import Metric

    from kftune.monitor.report import plot, render
    from kftune.tracking import key_part

    p = check["point"]
    metrics = {"requests": p["requests"], "new_requests": p["new_requests"], "alerts_failing":
               sum(s == R.FAILING for s in p["alerts"].values())}
    metrics.update({f"share_{key_part(k)}": v for k, v in p["shares"].items()})
    if p["confidence"] is not None:
        metrics["mean_confidence"] = p["confidence"]
    for m, c in check["drift"].items():
        metrics[f"drift_{m}_score"] = c["score"]
        metrics[f"drift_{m}_flag"] = float(c["verdict"])
        if c["p_value"] is not None:
            metrics[f"drift_{m}_p_value"] = c["p_value"]
    if check["drifted"] is not None:
        metrics["drift"] = float(check["drifted"])
    for k in ("accuracy", "accuracy_low", "accuracy_high", "macro_f1", "macro_f1_low", "macro_f1_high", "n"):
        if k in check["live"]:
            metrics[f"live_{k}"] = check["live"][k]
    metrics.update({f"alert_{key_part(v['name'])}_failing": float(v["status"] == R.FAILING) for v in check["rules"]
                    if v["status"] != R.UNKNOWN})
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, check["check"]) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(render(check), encoding="utf-8")
        plot(history, out / "monitor.png")
        (out / "check.json").write_text(json.dumps({k: v for k, v in check.items() if k != "point"}, indent=1,
                                                   default=str), encoding="utf-8")
        for f in ("report.md", "monitor.png", "check.json"):
            client.log_artifact(run_id, str(out / f), "monitor")
