"""The closed loop on replayed traffic: champion v1 -> `kftune serve` -> i.i.d. hours, then a drifted
stretch (new sectors, a negative surge) -> `kftune monitor` alerts -> the labelling queue, labelled by a
simulated labeller (the generator's true labels, some noise) -> a new data version -> retraining ->
gate -> v2 promoted -> the running server swaps to v2 under load -> live accuracy on random-sample labels.

Time is compressed: each simulated hour of traffic is sent in seconds with its simulated timestamps
(X-Kftune-Time, recorded because the demo serves with serve.trust_client_time=true), and every
monitoring check is given the simulated time of its hour's end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

START = 1_767_225_600.0  # simulated clock: 2026-01-01T00:00Z
HOUR = 3600.0


@dataclass
class Plan:
    rows: int = 3000  # v1's batch; at 1,500 MiniLM-L6 tied TF-IDF (0.850 vs 0.851) and the gate held v1
    iid_hours: int = 3
    drift_hours: int = 3  # drifted hours before the labels are collected
    after_hours: int = 2  # drifted hours served by v2
    per_hour: int = 200
    labels: int = 300  # labelling queue size
    label_noise: float = 0.05
    overrides: list = field(default_factory=lambda: [
        "retrain.cooldown_hours=0", "retrain.min_new_rows=1000000", "retrain.min_new_test_rows=20",
        "serve.poll_seconds=1", "serve.log_flush_seconds=0.5", "serve.trust_client_time=true",
        "monitor.min_requests=150"])


FAST = Plan(rows=600, iid_hours=2, drift_hours=2, after_hours=1, per_hour=160, labels=240, overrides=[
    *Plan().overrides, "drift.permutations=100", "drift.max_rows=400", "finetune.max_steps=60"])


def demo_source(hour: int, rows: int, drift: float, seed: int = 7) -> pd.DataFrame:
    from kftune.demo.data import generate

    return generate(100 + hour, rows, drift=drift, seed=seed, label_noise=0.0)


class Server:
    def __init__(self, workdir: Path, params_path: Path, model: str, overrides: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(workdir / "serve.log", "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "kftune.serving", "--project-dir", str(workdir), "serve",
                                      "--model", model, "--port", str(port), "--params", str(params_path),
                                      *[f"-S{o}" for o in overrides]], cwd=workdir, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kftune serve exited with {self.proc.returncode} (see serve.log)")
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"kftune serve not ready after {timeout}s (see serve.log)")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def send_hour(url: str, model: str, rows: pd.DataFrame, hour: int, truth: dict, batch: int = 8) -> dict:
    """One simulated hour of traffic; returns {served versions: count, failed: n}."""
    import requests

    out = {"failed": 0, "versions": {}}
    for i in range(0, len(rows), batch):
        part = rows.iloc[i:i + batch]
        rid = f"h{hour:03d}-{i:05d}"
        at = START + hour * HOUR + (i + 0.5) * HOUR / len(rows)
        body = {"id": rid, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(part)],
                                       "data": part["text"].tolist()}]}
        r = requests.post(f"{url}/v2/models/{model}/infer", json=body, headers={"X-Kftune-Time": str(at)}, timeout=60)
        if r.status_code != 200:
            out["failed"] += 1
            continue
        v = r.json()["model_version"]
        out["versions"][v] = out["versions"].get(v, 0) + 1
        for j, lbl in enumerate(part["label"]):
            truth[(rid, j)] = lbl
    return out


def wait_logged(log_dir: Path, expected: int, timeout: float = 60) -> None:
    from kftune.serving.request_log import read_request_log

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_dir.exists() and read_request_log(str(log_dir))["request_id"].str.startswith("h").sum() >= expected:
            return
        time.sleep(0.3)
    raise RuntimeError(f"the request log did not reach {expected} predictions in {timeout}s")


def simulated_labeller(queue_csv: Path, truth: dict, noise: float, labels: list[str], seed: int, out: Path) -> int:
    rng = np.random.default_rng(seed)
    q = pd.read_csv(queue_csv, dtype=str, keep_default_na=False)
    true = [truth.get((r, int(i)), "") for r, i in zip(q["request_id"], q["index"])]  # "": cannot tell, left blank
    q["label"] = [rng.choice([x for x in labels if x != t]) if t and rng.random() < noise else t for t in true]
    q["labeller"] = "simulated"
    q.to_csv(out, index=False)
    return len(q)


def load_keeper(url: str, model: str, rows: pd.DataFrame, truth: dict, stop: threading.Event, stats: dict,
                at: float) -> None:
    """Steady traffic while the champion changes (drifted rows, one per request, their labels kept for the
    labeller): every answer counted, every failure too."""
    import requests

    n = 0
    while not stop.is_set():
        text, label = rows.iloc[n % len(rows)]
        n += 1
        rid = f"keeper-{n:05d}"
        try:
            r = requests.post(f"{url}/v1/models/{model}:predict", json={"instances": [text]}, timeout=30,
                              headers={"X-Request-ID": rid, "X-Kftune-Time": str(at)})
            ok = r.status_code == 200
            if ok:
                v = r.json()["predictions"][0]["model_version"]
                stats["versions"][v] = stats["versions"].get(v, 0) + 1
                truth[(rid, 0)] = label
        except requests.RequestException:
            ok = False
        stats["ok" if ok else "failed"] += 1
        time.sleep(0.05)


def run_loop(workdir: str | Path, params_path: str | Path = "params.yaml", overrides: list[str] = (),
             fast: bool = False, plan: Plan | None = None, source=demo_source, surge_label: str = "negative",
             surge_share: float = 0.45, echo=print, port: int | None = None) -> dict:
    """Run the whole loop; print (echo) a timeline, write timeline.json and demo-loop.png in workdir."""
    from kftune.config import load_params
    from kftune.data import add_batches
    from kftune.demo.drift import setup_project
    from kftune.local import describe_outcome, run_retraining_local
    from kftune.monitor.check import monitor_once
    from kftune.monitor.labels import import_labels, queue
    from kftune.monitor.report import plot
    from kftune.tracking import configure, git_commit

    plan = plan or (FAST if fast else Plan())
    workdir = Path(workdir).resolve()
    params_path = Path(params_path).resolve()
    setup_project(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ.setdefault("KFTUNE_GIT_COMMIT", git_commit(Path(__file__).parent))
    configure(workdir)
    log_dir = workdir / "request-log"
    sets = [*plan.overrides, f"serve.log_dir={log_dir}",
            f"monitor.rules=[{{name: {surge_label}-surge, kind: label_share, label: {surge_label}, max_share: {surge_share}, "
            f"window: 1h, min_requests: 100}}, {{name: drift, kind: drift, window: 1h, min_requests: 100}}, "
            f"{{name: live-quality-gap, kind: live_quality, max_gap: 0.05, window: 30d, min_requests: 30}}]",
            *overrides]
    params = load_params(params_path, sets)
    name = params.register.model_name
    t0 = time.monotonic()
    events, timeline = [], {}

    def mark(what: str, **extra) -> None:
        row = {"wall_s": round(time.monotonic() - t0, 1), "what": what, **extra}
        events.append(row)
        echo(f"[{row['wall_s']:>7.1f}s] {what}")

    incoming = workdir.parent / f"{workdir.name}-incoming"
    incoming.mkdir(exist_ok=True)
    first = incoming / "batch-000.csv"
    source(0, plan.rows, 0.0).to_csv(first, index=False)
    add_batches([str(first)], workdir, params.ingest, tag="batch-0")
    o = run_retraining_local(params, workdir)
    mark(f"v1 trained: {describe_outcome(o)}")
    if o["champion"] != "1":
        raise RuntimeError("v1 was not promoted; the loop needs a champion to serve")

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = port or s.getsockname()[1]
    server = Server(workdir, params_path, name, sets, port)
    truth, sent, checks, drift_start = {}, 0, [], None
    promoted, stats = False, {"ok": 0, "failed": 0, "versions": {}}
    try:
        server.wait_ready()
        mark(f"kftune serve ready on {server.url} (v1)")
        hour = 0

        def replay(hours: int, drift: float) -> None:
            nonlocal hour, sent
            for _ in range(hours):
                rows = source(hour + 1, plan.per_hour, drift)
                send_hour(server.url, name, rows, hour, truth)
                sent += len(rows)
                wait_logged(log_dir, sent)
                c = monitor_once(str(log_dir), params, now=START + (hour + 1) * HOUR, cache_dir=workdir / ".kftune" /
                                 "monitor")
                checks.append(c)
                fired = [f"{e['alert']} {e['status']}" for e in c["events"]]
                mark(f"hour {hour} (drift {drift:g}): served v{c['version']}, {c['requests']} predictions, "
                     f"{surge_label} {c['point']['shares'].get(surge_label, 0):.0%}, drift "
                     f"{'yes' if c['drifted'] else 'no' if c['drifted'] is not None else '-'}"
                     + (f"; ALERTS: {', '.join(fired)}" if fired else ""), hour=hour, events=fired)
                hour += 1

        replay(plan.iid_hours, 0.0)
        drift_start = hour
        replay(plan.drift_hours, 1.0)
        fired_at = [e["hour"] for e in events if any("firing" in f for f in e.get("events", []))]
        after_start = [h for h in fired_at if h >= drift_start]
        timeline["alert_latency_hours"] = (after_start[0] + 1 - drift_start) if after_start else None
        timeline["false_alarms"] = [f"hour {e['hour']}: {f}" for e in events if e.get("hour", drift_start) < drift_start
                                    for f in e.get("events", []) if "firing" in f]

        # label what the alerts are about: the traffic since the drift started, so the random sample estimates
        # v1's live accuracy on the drifted traffic (the same kind of traffic v2 is measured on afterwards)
        q = queue(str(log_dir), params, plan.labels, workdir / "labelling" / "round-1", since=_at(drift_start),
                  cache_dir=workdir / ".kftune" / "monitor")
        labels = q["labels"]
        n = simulated_labeller(workdir / "labelling" / "round-1" / "queue.csv", truth, plan.label_noise, labels, 1,
                               workdir / "labelling" / "round-1" / "labelled.csv")
        imp = import_labels(workdir / "labelling" / "round-1" / "labelled.csv", params, workdir, str(log_dir),
                            tag="labels-1", cache_dir=workdir / ".kftune" / "monitor")
        timeline["labels"] = n
        mark(f"labelling queue {q['by_sample']} labelled by the simulated labeller; {imp['added']} texts -> data "
             f"version {(imp['commit'] or 'unchanged')[:8]}")
        before = monitor_once(str(log_dir), params, now=START + hour * HOUR + 1, cache_dir=workdir / ".kftune" /
                              "monitor")
        checks.append(before)
        timeline["live_accuracy_before"] = before["live"].get("accuracy")
        timeline["live_macro_f1_before"] = before["live"].get("macro_f1")
        timeline["live_accuracy_before_ci"] = [before["live"].get("accuracy_low"), before["live"].get("accuracy_high")]
        mark(f"live accuracy of v1 on {before['live'].get('n', 0)} random-sample labels: "
             f"{_f(before['live'].get('accuracy'))} [{_f(before['live'].get('accuracy_low'))}, "
             f"{_f(before['live'].get('accuracy_high'))}], macro-F1 {_f(before['live'].get('macro_f1'))}" +
             (f"; ALERTS: {', '.join(e['alert'] + ' ' + e['status'] for e in before['events'])}" if before["events"] else ""))

        stop = threading.Event()
        keeper_rows = source(1000 + hour, 5000, 1.0)[["text", "label"]]
        keeper = threading.Thread(target=load_keeper, args=(server.url, name, keeper_rows, truth, stop, stats,
                                                            START + hour * HOUR + 2), daemon=True)
        keeper.start()
        t_retrain = time.monotonic()
        o = run_retraining_local(params, workdir)
        mark(f"retraining: {describe_outcome(o)}")
        promoted = o["champion"] == o["challenger_version"] and o["challenger_version"] != "1"
        if promoted:
            deadline = time.monotonic() + 300
            while "2" not in stats["versions"] and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(1)
        stop.set()
        keeper.join()
        timeline["retrain_to_swap_s"] = round(time.monotonic() - t_retrain, 1) if promoted else None
        timeline["swap_requests"] = dict(stats)
        mark(f"server now answers with {sorted(stats['versions'])}: {stats['ok']} requests ok, {stats['failed']} "
             f"failed during retraining and the swap")
        timeline["v2_promoted"] = promoted
        timeline["time_to_v2_s"] = round(time.monotonic() - t0, 1) if promoted else None

        replay(plan.after_hours, 1.0)
        q2 = queue(str(log_dir), params, plan.labels, workdir / "labelling" / "round-2",
                   since=_at(hour - plan.after_hours),
                   cache_dir=workdir / ".kftune" / "monitor")
        simulated_labeller(workdir / "labelling" / "round-2" / "queue.csv", truth, plan.label_noise, labels, 2,
                           workdir / "labelling" / "round-2" / "labelled.csv")
        import_labels(workdir / "labelling" / "round-2" / "labelled.csv", params, workdir, str(log_dir), tag="labels-2",
                      cache_dir=workdir / ".kftune" / "monitor")
        after = monitor_once(str(log_dir), params, now=START + hour * HOUR + 1, cache_dir=workdir / ".kftune" /
                             "monitor")
        checks.append(after)
        timeline["live_accuracy_after"] = after["live"].get("accuracy")
        timeline["live_macro_f1_after"] = after["live"].get("macro_f1")
        timeline["live_accuracy_after_ci"] = [after["live"].get("accuracy_low"), after["live"].get("accuracy_high")]
        same = rescore_previous(log_dir, name, after["version"], "1", params, workdir / ".kftune" / "monitor")
        timeline["v1_on_the_same_rows"] = {k: same.get(k) for k in ("n", "accuracy", "macro_f1")}
        mark(f"live accuracy of v{after['version']} on {after['live'].get('n', 0)} random-sample labels of its own "
             f"traffic: {_f(after['live'].get('accuracy'))} [{_f(after['live'].get('accuracy_low'))}, "
             f"{_f(after['live'].get('accuracy_high'))}], macro-F1 {_f(after['live'].get('macro_f1'))} ({q2['by_sample']})" +
             (f"; ALERTS: {', '.join(e['alert'] + ' ' + e['status'] for e in after['events'])}" if after["events"] else ""))
        mark(f"v1 on the same {same.get('n', 0)} random-sample labels (paired control): accuracy "
             f"{_f(same.get('accuracy'))}, macro-F1 {_f(same.get('macro_f1'))}")
    finally:
        server.stop()
    from kftune.monitor.check import load_state

    plot(load_state(str(log_dir))["history"], workdir / "demo-loop.png")
    timeline.update(wall_s=round(time.monotonic() - t0, 1), drift_start_hour=drift_start, events=events)
    (workdir / "timeline.json").write_text(json.dumps(timeline, indent=1, default=str), encoding="utf-8")
    echo(f"\nalert latency after the drift starts: {timeline['alert_latency_hours']} simulated hour(s) (false alarms "
         f"before it: {', '.join(timeline['false_alarms']) or 'none'}); labels: "
         f"{timeline['labels']}; v2 promoted: {promoted} after {timeline['time_to_v2_s']} s; live accuracy "
         f"{_f(timeline['live_accuracy_before'])} -> {_f(timeline['live_accuracy_after'])}, macro-F1 "
         f"{_f(timeline['live_macro_f1_before'])} -> {_f(timeline['live_macro_f1_after'])} (v1 on v2's sample: "
         f"{_f(timeline['v1_on_the_same_rows']['accuracy'])}, {_f(timeline['v1_on_the_same_rows']['macro_f1'])}); "
         f"{stats['failed']} failed requests during the swap; picture: {workdir / 'demo-loop.png'}")
    return {**timeline, "checks": checks}


def rescore_previous(log_dir: Path, name: str, served: str, previous: str, params, cache: Path) -> dict:
    """Live quality `previous` would have had on the random-sample labels of the traffic `served` answered:
    a paired control, so "v2 recovers" is not a comparison of two different stretches of traffic."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kftune.monitor.check import champion_files
    from kftune.monitor.feedback import joined, live_quality, read_feedback
    from kftune.predict import labels_of, predict_proba_with
    from kftune.serving.request_log import read_request_log

    logged = read_request_log(str(log_dir))
    rows = joined(logged[logged["model"] == name], read_feedback(str(log_dir)))  # then by version: ids are reused
    rows = rows[(rows["version"] == served) & (rows["sample"] == "random")]
    if rows.empty:
        return {"n": 0}
    folder, _, _ = champion_files(name, previous, cache)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    labels = labels_of(model)
    probs = predict_proba_with(model, AutoTokenizer.from_pretrained(folder), rows["text"].tolist(),
                               params.evaluate.batch_size)
    return live_quality(rows.assign(label=[labels[i] for i in probs.argmax(1)]), labels,
                        params.monitor.confidence_level)


def _at(hour: int):
    return pd.Timestamp(START + hour * HOUR, unit="s", tz="UTC").to_pydatetime()


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
