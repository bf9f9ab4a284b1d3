"""The monitor on a synthetic request log with a known negative surge: it fires once and resolves once."""

import json
from types import SimpleNamespace

import mlflow

from kftune.monitor.check import load_state, monitor_once
from kftune.monitor.feedback import write_feedback
from kftune.serving.request_log import RequestLog, records
from tests.conftest import ner_sentences
from tests.monitor.conftest import TAGGER, monitor_params, write_traffic

START = 1_700_000_000.0  # a fixed simulated clock
SURGE = '[{name: negative-surge, kind: label_share, label: negative, max_share: 0.5, window: 1h, min_requests: 50}, ' \
        '{name: no-traffic, kind: volume, window: 1h, min_requests: 1}]'


def test_a_surge_fires_once_and_resolves_once_and_the_webhook_gets_both(store, tiny_model, tmp_path, receiver):
    hook = receiver(fail_first=1)  # the first POST fails: the sink must retry
    params = monitor_params(tiny_model, f"monitor.rules={SURGE}", "monitor.sinks=[log, webhook, mlflow]",
                            f"monitor.webhook_url={hook.url}", "monitor.webhook_backoff_seconds=0.01")
    log_dir = tmp_path / "log"
    shares = [0.3, 0.3, 0.3, 0.8, 0.8, 0.8, 0.3, 0.3, 0.3]  # hours 3-5 are the surge
    write_traffic(log_dir, START, shares, per_hour=60)
    checks = [monitor_once(str(log_dir), params, now=START + (h + 1) * 3600) for h in range(len(shares))]
    events = [(c["check"], e["alert"], e["status"]) for c in checks for e in c["events"]]
    assert events == [(4, "negative-surge", "firing"), (7, "negative-surge", "resolved")]
    assert [d["status"] for d in hook.documents] == ["firing", "resolved"]
    assert hook.attempts == 3 and hook.documents[0]["alert"] == "negative-surge"
    assert 0.6 < hook.documents[0]["value"] <= 1 and hook.documents[0]["check_run_id"] == checks[3]["run_id"]
    # the drift tests ran on every hour (60 >= monitor.min_requests=50): the watermark follows the traffic
    assert all(c["drifted"] is not None for c in checks)
    state = load_state(str(log_dir))
    assert state["checks"] == 9 and state["alerts"]["negative-surge"]["status"] == "ok"
    assert state["watermark"].startswith(str(checks[-1]["point"]["now"])[:13])
    # every check is an MLflow run with the metrics, the report and the picture
    run = mlflow.MlflowClient().get_run(checks[3]["run_id"])
    assert run.data.metrics["alert_negative-surge_failing"] == 1.0 and run.data.tags["kftune.alert.negative-surge"] == "firing"
    assert 0.6 < run.data.metrics["share_negative"] < 1
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "monitor")}
    assert names == {"monitor/report.md", "monitor/monitor.png", "monitor/check.json"}


def test_a_second_check_without_new_traffic_keeps_the_watermark_and_fires_no_traffic(store, tiny_model, tmp_path):
    params = monitor_params(tiny_model, f"monitor.rules={SURGE}")
    log_dir = tmp_path / "log"
    write_traffic(log_dir, START, [0.3], per_hour=60)
    first = monitor_once(str(log_dir), params, now=START + 3600)
    assert first["events"] == [] and first["new_requests"] == 60
    second = monitor_once(str(log_dir), params, now=START + 3 * 3600)  # two quiet hours
    assert second["new_requests"] == 0 and second["drifted"] is None
    assert [(e["alert"], e["status"]) for e in second["events"]] == [("no-traffic", "firing")]
    assert second["watermark"] == first["watermark"]


def test_rows_younger_than_two_flushes_wait_for_the_next_check(store, tiny_model, tmp_path):
    params = monitor_params(tiny_model, f"monitor.rules={SURGE}", "serve.log_flush_seconds=5")
    log_dir = tmp_path / "log"
    write_traffic(log_dir, START, [0.3], per_hour=60)  # one row a minute, the last at START + 59 min
    first = monitor_once(str(log_dir), params, now=START + 3540 + 9)  # the last row is 9 s old: not yet
    assert first["new_requests"] == 59 and first["drifted"] is not None
    second = monitor_once(str(log_dir), params, now=START + 2 * 3600)
    assert second["new_requests"] == 1 and second["watermark"] == first["watermark"]


def test_no_traffic_is_not_an_alert_before_the_first_prediction(store, tiny_model, tmp_path):
    params = monitor_params(tiny_model, f"monitor.rules={SURGE}")
    log_dir = tmp_path / "log"
    for hour in (1, 2, 3):  # a fresh deployment nobody has called yet
        check = monitor_once(str(log_dir), params, now=START + hour * 3600)
        assert check["events"] == [] and [r["status"] for r in check["rules"]] == ["unknown", "unknown"]
    write_traffic(log_dir, START + 3 * 3600, [0.3], per_hour=60)
    assert monitor_once(str(log_dir), params, now=START + 4 * 3600)["events"] == []
    quiet = monitor_once(str(log_dir), params, now=START + 6 * 3600)
    assert [(e["alert"], e["status"]) for e in quiet["events"]] == [("no-traffic", "firing")]


def test_report_escapes_markdown_in_labels_and_reasons(store, tiny_model, tmp_path):
    from kftune.monitor.report import md

    assert md("a|b <script>*x*") == "a\\|b \\<script\\>\\*x\\*"
    assert "\x1b" not in md("\x1b[31mred")
    params = monitor_params(tiny_model, f"monitor.rules={SURGE}")
    log_dir = tmp_path / "log"
    write_traffic(log_dir, START, [0.3], per_hour=60)
    check = monitor_once(str(log_dir), params, now=START + 3600, out_dir=tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "negative\\-surge" in report and (tmp_path / "out" / "monitor.png").stat().st_size > 10000
    assert json.loads((tmp_path / "out" / "check.json").read_text())["run_id"] == check["run_id"]


def test_the_monitoring_pipeline_compiles_with_its_defaults_from_params(tmp_path):
    import yaml
    from kfp import compiler

    from kftune.config import load_params
    from pipelines.monitoring import create_pipeline
    from tests.conftest import ROOT

    params = load_params(ROOT / "params.yaml")
    compiler.Compiler().compile(create_pipeline(params.to_dict(), cluster=True), str(tmp_path / "m.yaml"))
    spec = next(yaml.safe_load_all((tmp_path / "m.yaml").read_text()))  # then the Kubernetes platform spec
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["log_dir"]["defaultValue"] == "request-log"
    assert inputs["params"]["defaultValue"]["monitor"]["rules"][0]["name"] == "negative-surge"


def test_kftune_schedule_monitor_runs_the_check_as_a_task_before_the_retraining(store, tiny_model, tmp_path,
                                                                                 monkeypatch, capsys):
    import time
    from datetime import datetime

    from kftune import schedule
    from kftune.cli import main
    from tests.conftest import ROOT
    from tests.monitor.conftest import FAST, MODEL
    from tests.test_schedule import FakeClock

    log_dir = tmp_path / "log"
    write_traffic(log_dir, time.time() - 3000, [0.8], per_hour=60)  # a surge in the last hour (checks use the clock)
    clock = FakeClock(datetime(2026, 11, 22, 10, 20))
    stop_at = datetime(2026, 11, 22, 10, 50).timestamp()  # after the 10:30 and 10:45 checks, before 11:00's retraining

    def sleep(seconds):
        if clock.t + seconds > stop_at:
            raise KeyboardInterrupt
        clock.sleep(seconds)

    monkeypatch.setattr(schedule.Clock, "now", staticmethod(clock.now))
    monkeypatch.setattr(schedule.Clock, "sleep", staticmethod(sleep))
    sets = [f"model.name={tiny_model}", f"register.model_name={MODEL}", "finetune.bf16=false", *FAST,
            f"serve.log_dir={log_dir}", f"monitor.rules={SURGE}"]
    assert main(["--project-dir", str(tmp_path), "schedule", "--cron", "0 * * * *", "--monitor", "*/15 * * * *",
                 "--params", str(ROOT / "params.yaml"), *[f"-S{s}" for s in sets]]) == 0
    out = capsys.readouterr().out
    assert out.count("check ") >= 2 and "ALERT negative-surge firing" in out and "scheduler stopped" in out
    state = load_state(str(log_dir))
    assert state["checks"] == 2 and [p["events"] for p in state["history"]] == [["negative-surge firing"], []]
    assert not (tmp_path / "local_outputs").exists()  # the retraining's 11:00 run never came


def test_schedule_monitor_needs_a_cron_of_its_own_that_parses(capsys):
    from kftune.cli import main

    assert main(["schedule", "--cron", "0 3 * * *", "--monitor", "every 15 minutes"]) == 2
    assert "--cron 'every 15 minutes': not a 5-field cron expression" in capsys.readouterr().err


def test_a_webhook_url_is_a_credential_and_never_an_mlflow_param(store, tiny_model):
    from kftune.tracking import start_run

    params = monitor_params(tiny_model, "monitor.webhook_url=https://hooks.example.com/services/T0/B0/s3cret")
    logged = mlflow.MlflowClient().get_run(start_run(params)).data.params
    assert logged["monitor.webhook_url"] == "https://hooks.example.com/..."
    assert not any("s3cret" in v for v in logged.values())


def test_the_webhook_url_may_come_from_the_environment_as_a_cluster_secret_sets_it(receiver, monkeypatch):
    import pytest

    from kftune.config import ConfigError, load_params
    from kftune.monitor.sinks import deliver
    from tests.conftest import ROOT

    monkeypatch.delenv("KFTUNE_WEBHOOK_URL", raising=False)
    # params load without it (every cluster task reads them, only the monitoring task has the Secret) ...
    cfg = load_params(ROOT / "params.yaml", ["monitor.sinks=[log, webhook]"]).monitor
    with pytest.raises(ConfigError, match="monitor.webhook_url is empty and KFTUNE_WEBHOOK_URL is not set"):
        cfg.check_webhook()  # ... and a check refuses to start without somewhere to send its alerts
    monkeypatch.setenv("KFTUNE_WEBHOOK_URL", "hooks.example.com/T0/s3cret")
    with pytest.raises(ConfigError, match="KFTUNE_WEBHOOK_URL is not an http") as refused:
        cfg.check_webhook()
    assert "s3cret" not in str(refused.value)
    with pytest.raises(ConfigError, match="monitor.webhook_url: not an http.s. URL .the value is a credential"):
        load_params(ROOT / "params.yaml", ["monitor.webhook_url=hooks.example.com/T0/s3cret"])
    hook = receiver()
    monkeypatch.setenv("KFTUNE_WEBHOOK_URL", hook.url + "\n")  # a Secret made --from-file ends in a newline
    cfg = load_params(ROOT / "params.yaml", ["monitor.sinks=[log, webhook]"]).monitor
    delivered = deliver([{"alert": "drift", "status": "firing", "why": "p < 0.01"}], cfg)
    assert [d["alert"] for d in hook.documents] == ["drift"] and "webhook" in delivered[0]["delivery"]
    # a URL in params.yaml wins over the environment
    other = receiver()
    cfg = load_params(ROOT / "params.yaml", ["monitor.sinks=[log, webhook]", f"monitor.webhook_url={other.url}"]).monitor
    deliver([{"alert": "drift", "status": "resolved", "why": "p = 0.4"}], cfg)
    assert len(hook.documents) == 1 and [d["status"] for d in other.documents] == ["resolved"]


def test_a_check_compacts_closed_days_and_applies_the_retention(store, tiny_model, tmp_path):
    import pytest

    from kftune.config import ConfigError
    from kftune.serving.request_log import read_request_log

    log_dir = tmp_path / "log"
    write_traffic(log_dir, START, [0.3], per_hour=60)  # one hour, one file
    write_traffic(log_dir, START + 1800, [0.3], per_hour=60, seed=1)  # a second file of the same day
    check = monitor_once(str(log_dir), monitor_params(tiny_model, f"monitor.rules={SURGE}"), now=START + 3 * 86400)
    assert check["log"] == {"compacted": 1, "files": 2, "deleted": 0, "failed": []} and len(read_request_log(str(log_dir))) == 120
    from kftune.monitor.cli import describe_check

    assert "request log: 1 day(s) compacted from 2 file(s), 0 day(s)" in describe_check(check)
    with pytest.raises(ConfigError, match="monitor.log_retention_days=2: shorter than the longest rule window .7 days"):
        monitor_params(tiny_model, "monitor.log_retention_days=2")  # the default rules judge 7 days of labels
    params = monitor_params(tiny_model, f"monitor.rules={SURGE}", "monitor.log_retention_days=2")
    assert monitor_once(str(log_dir), params, now=START + 3 * 86400)["log"]["deleted"] == 1
    assert len(read_request_log(str(log_dir))) == 0


def test_webhook_waits_are_capped_and_a_redirect_is_not_followed(receiver):
    """A redirect would turn the POST into a GET without the alert, and its 200 would read as delivered."""
    from kftune.monitor.sinks import post_webhook

    waits = []
    hook = receiver(fail_first=10)
    ok, detail = post_webhook(hook.url, {"alert": "a"}, retries=9, backoff=10, timeout=5, sleep=waits.append)
    assert not ok and hook.attempts == 10 and waits == [10, 20, 40, 60, 60, 60, 60, 60, 60]
    moved = receiver(redirect=True)
    ok, detail = post_webhook(moved.url, {"alert": "a"}, retries=3, backoff=0, timeout=5, sleep=waits.append)
    assert not ok and detail.startswith("HTTP 302: not retried") and moved.attempts == 1


def test_a_receiver_that_trickles_its_answer_costs_one_timeout_per_attempt(receiver):
    """requests' timeout bounds each read; a receiver sending a byte every 0.2 s would hold the check ~8 s."""
    import time

    from kftune.monitor.sinks import post_webhook

    slow = receiver(trickle=0.2)
    start = time.monotonic()
    ok, detail = post_webhook(slow.url, {"alert": "a"}, retries=1, backoff=0, timeout=0.5, sleep=lambda s: None)
    assert time.monotonic() - start < 3 and not ok
    assert detail == "TimeoutError after 2 attempts" and slow.attempts == 2


def test_a_label_share_rule_on_a_label_the_champion_lacks_says_it_cannot_fire(store, tiny_model, tmp_path, caplog):
    rules = ("[{name: typo, kind: label_share, label: negatve, max_share: 0.01, window: 1h, min_requests: 10}, "
             "{name: surge, kind: label_share, label: negative, max_share: 0.01, window: 1h, min_requests: 10}]")
    log_dir = tmp_path / "log"
    write_traffic(log_dir, START, [0.5], per_hour=60)
    with caplog.at_level("WARNING", logger="kftune.monitor.check"):
        check = monitor_once(str(log_dir), monitor_params(tiny_model, f"monitor.rules={rules}"), now=START + 3600)
    typo, surge = check["rules"]
    assert typo["status"] == "ok" and "has no label 'negatve'" in typo["why"] and "negative" in typo["why"]
    assert surge["status"] == "failing" and list(check["cannot_fire"]) == ["typo"]
    assert "monitor rule typo: the champion has no label 'negatve'" in caplog.text
    from kftune.monitor.cli import describe_check

    assert "rule typo cannot fire: the champion has no label 'negatve'" in describe_check(check)


def test_volume_counts_every_versions_predictions(store, tiny_model, tmp_path):
    """Just after a promotion the server still answers with the old version for a poll or two: traffic is
    healthy, and the volume rule must not say "no traffic" because the champion has none of it yet."""
    rules = "[{name: no-traffic, kind: volume, window: 1h, min_requests: 10}]"
    log_dir = tmp_path / "log"
    write_traffic(log_dir, START, [0.3, 0.3], per_hour=30, version="7")  # v1 is the champion
    check = monitor_once(str(log_dir), monitor_params(tiny_model, f"monitor.rules={rules}"), now=START + 2 * 3600)
    assert load_state(str(log_dir))["alerts"]["no-traffic"]["status"] == "ok" and check["events"] == []


def test_checks_of_one_log_wait_for_each_other_and_the_state_file_is_written_whole(tmp_path):
    import threading
    import time

    from kftune.monitor.check import STATE, one_check_at_a_time, save_state

    log_dir, order = tmp_path / "log", []

    def check(name):
        with one_check_at_a_time(str(log_dir)):
            order.append(f"{name} start")
            time.sleep(0.3)
            order.append(f"{name} end")

    threads = [threading.Thread(target=check, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["a start", "a end", "b start", "b end"], ["b start", "b end", "a start", "a end"])
    save_state(str(log_dir), {"checks": 1})
    assert json.loads((log_dir / STATE).read_text()) == {"checks": 1}
    assert [p.name for p in (log_dir / "_monitor").iterdir() if p.name.endswith(".tmp")] == []


def test_a_taggers_traffic_is_monitored_by_volume_and_the_tagged_drift_tests(store, tiny_model, tmp_path):
    """A tagger logs entities, not a label: its predictions count, its drift tests run, and the rules that read a
    label per text say they cannot."""
    rules = ("[{name: no-traffic, kind: volume, window: 1h, min_requests: 1}, {name: drift, kind: drift, window: 1h, "
             "min_requests: 50}, {name: surge, kind: label_share, label: per, max_share: 0.5, window: 1h, "
             "min_requests: 1}]")
    params = monitor_params(tiny_model, f"register.model_name={TAGGER}", "task=token-classification",
                            f"monitor.rules={rules}")
    served = SimpleNamespace(name=TAGGER, version="1", precision="fp32", task="token-classification",
                             labels=["B-org", "B-per", "I-org", "O"])
    log_dir = tmp_path / "log"
    out = RequestLog(str(log_dir), 100000, 3600, 100000)
    for i, (words, _) in enumerate(ner_sentences(60, seed=7)):
        text = " ".join(words)
        answer = {"entities": [{"type": "per", "text": words[0], "start": 0, "end": len(words[0]), "score": 0.9}]}
        out.append(records(f"n{i}", served, [text], [answer], at=START + i * 60))
    out.close()
    first = monitor_once(str(log_dir), params, now=START + 3600)
    assert first["new_requests"] == 60 and first["drifted"] is not None and "entities" in first["drift"]
    status = {r["name"]: (r["status"], r["why"]) for r in first["rules"]}
    assert status["no-traffic"][0] == "ok" and status["drift"][0] != "unknown"
    assert status["surge"] == ("unknown", "a tagger's predictions have no label or confidence per text")
    quiet = monitor_once(str(log_dir), params, now=START + 3 * 3600)
    assert ("no-traffic", "firing") in [(e["alert"], e["status"]) for e in quiet["events"]]


def test_without_a_test_that_runs_on_unlabelled_traffic_drift_is_unknown(store, tiny_model, tmp_path):
    rules = "[{name: drift, kind: drift, window: 1h, min_requests: 50}]"
    params = monitor_params(tiny_model, "drift.methods=[label]", "drift.min_flags=1", f"monitor.rules={rules}")
    write_traffic(tmp_path / "log", START, [0.3], per_hour=60)
    check = monitor_once(str(tmp_path / "log"), params, now=START + 3600)
    assert check["drifted"] is None and check["rules"][0]["status"] == "unknown" and check["events"] == []
    assert "none of drift.methods ['label'] runs on unlabelled traffic" in check["drift_why"]


def test_label_shift_waits_for_the_champions_predicted_shares(store, tiny_model, tmp_path):
    """The reference is the champion's predicted shares on its held-out rows, which the drift tests compute:
    until they have run, the held-out rows' true shares would be a different yardstick."""
    rules = "[{name: shift, kind: label_shift, max_points: 1, window: 1h, min_requests: 10}]"
    params = monitor_params(tiny_model, "monitor.min_requests=100", f"monitor.rules={rules}")
    write_traffic(tmp_path / "log", START, [0.3], per_hour=60)
    early = monitor_once(str(tmp_path / "log"), params, now=START + 3600)  # 60 < 100: no drift tests yet
    assert early["drifted"] is None and early["rules"][0]["status"] == "unknown"
    assert "the drift tests have not run" in early["rules"][0]["why"]


def test_each_live_quality_rule_reads_the_labels_of_its_own_window(store, tiny_model, tmp_path):
    rules = ("[{name: day, kind: live_quality, max_gap: 0.1, window: 1h, min_requests: 1}, "
             "{name: week, kind: live_quality, max_gap: 0.1, window: 7d, min_requests: 1}]")
    log_dir = tmp_path / "log"
    rows = write_traffic(log_dir, START, [0.3] * 3, per_hour=20)
    write_feedback(str(log_dir), [{"request_id": r["request_id"], "index": 0, "label": r["label"], "sample": "random"}
                                  for r in rows])
    check = monitor_once(str(log_dir), monitor_params(tiny_model, f"monitor.rules={rules}"), now=START + 3 * 3600 - 1)
    why = {r["name"]: r["why"] for r in check["rules"]}
    assert "on 20 random-sample labels" in why["day"] and "on 60 random-sample labels" in why["week"]
    assert check["live"]["n"] == 60


def test_a_champion_export_another_process_finished_first_is_used_not_deleted(store, tmp_path, monkeypatch):
    import shutil

    from kftune.monitor import check
    from kftune.steps import resolve
    from tests.monitor.conftest import MODEL

    real = resolve.export_champion

    def export_while_another_finishes(name, version, dest):  # a label import exporting the same version meanwhile
        real(name, version, dest)
        theirs = tmp_path / "cache" / f"{name}-v{version}"
        shutil.copytree(dest, theirs)
        resolve.download_reference(name, version, tmp_path / "ref")[0].to_parquet(theirs / "reference.parquet")
        (theirs / "card.json").write_text("{}")
        (theirs / "being-read").write_text("by the other process")

    monkeypatch.setattr(resolve, "export_champion", export_while_another_finishes)
    folder, reference, _ = check.champion_files(MODEL, "1", tmp_path / "cache")
    assert (folder / "being-read").exists() and len(reference) > 0
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name], "no temporary export left"


def test_a_check_stopped_midway_leaves_its_run_to_the_next_check_of_the_log(store, tiny_model, tmp_path, receiver):
    """A check killed while its run is open (kill -9, an evicted pod) cannot end that run: the next check of the same
    log, holding the log's lock, closes it as KILLED and sends the alert the killed one never finished sending; a
    check of another log leaves it alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from kftune.monitor.check import CHECK_LOG, log_key
    from tests.conftest import ROOT

    hook = receiver(trickle=1.0)  # answers one byte a second: the first check sits in its delivery
    log_dir, other = tmp_path / "log", tmp_path / "other"
    for folder in (log_dir, other):
        write_traffic(folder, START, [0.9], per_hour=60)
    slow = [f"monitor.rules={SURGE}", "monitor.sinks=[log, webhook]", f"monitor.webhook_url={hook.url}",
            "monitor.webhook_timeout_seconds=120"]
    code = ("import sys; from kftune.monitor.check import monitor_once; from tests.monitor.conftest import "
            "monitor_params; monitor_once(sys.argv[1], monitor_params(sys.argv[2], *sys.argv[5:]), "
            "now=float(sys.argv[3]), cache_dir=sys.argv[4])")
    child = subprocess.Popen([sys.executable, "-c", code, str(log_dir), tiny_model, str(START + 3600),
                              str(tmp_path / "cache"), *slow], cwd=ROOT)
    client, running = mlflow.MlflowClient(), f"tags.`{CHECK_LOG}` = '{log_key(str(log_dir))}'"
    try:
        deadline = time.monotonic() + 120
        while not hook.attempts and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hook.attempts == 1, "the first check never reached its webhook"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    experiments = [e.experiment_id for e in client.search_experiments()]
    [left] = client.search_runs(experiments, running)
    assert left.info.status == "RUNNING"

    params = monitor_params(tiny_model, f"monitor.rules={SURGE}")
    monitor_once(str(other), params, now=START + 3600)
    assert client.get_run(left.info.run_id).info.status == "RUNNING", "another log's check closed it"
    check = monitor_once(str(log_dir), params, now=START + 3600)
    closed = client.get_run(left.info.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["kftune.status"] == "killed"
    assert "an earlier check of this request log" in closed.data.tags["kftune.failure"]
    assert [(e["alert"], e["status"]) for e in check["events"]] == [("negative-surge", "firing")]
    assert {r.info.status for r in client.search_runs(experiments, running)} == {"KILLED", "FINISHED"}


def test_a_check_that_fails_after_opening_its_run_ends_it_failed(store, tiny_model, tmp_path, monkeypatch):
    import pytest

    from kftune.monitor import check

    def full_disk(log_dir, state):
        raise OSError("No space left on device")

    monkeypatch.setattr(check, "save_state", full_disk)
    write_traffic(tmp_path / "log", START, [0.3], per_hour=60)
    with pytest.raises(OSError, match="No space left"):
        monitor_once(str(tmp_path / "log"), monitor_params(tiny_model, f"monitor.rules={SURGE}"), now=START + 3600)
    client = mlflow.MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               f"tags.`{check.CHECK_LOG}` = '{check.log_key(str(tmp_path / 'log'))}'")
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["kftune.failure"]


def test_a_correction_counts_for_the_prediction_it_was_about_not_a_later_one_under_the_same_id(
        store, tiny_model, tmp_path):
    """Clients reuse request ids. A correction belongs to the latest prediction at or before it, found over the whole
    log read: filtering by the rule's window or the champion's version first would hand it to a later prediction
    (another text) whenever its own one is older than the window or was served by an earlier champion."""
    from tests.monitor.conftest import MODEL

    log_dir = tmp_path / "log"
    write_traffic(log_dir, START, [0.3] * 3, per_hour=20)
    out = RequestLog(str(log_dir), 1000, 3600, 1000)
    answer = {"label": "negative", "probability": 0.9, "probabilities": {"negative": 0.9, "positive": 0.1}}
    for rid, version, hour in (("reused", "0", 0.2), ("again", "1", 0.3), ("reused", "1", 2.5), ("again", "1", 2.6)):
        served = SimpleNamespace(name=MODEL, version=version, precision="fp32", task="sequence-classification",
                                 labels=["negative", "positive"])
        out.append(records(rid, served, [f"{rid} at hour {hour}"], [answer], at=START + hour * 3600))
    out.close()
    at = __import__("pandas").Timestamp(START + 3600, unit="s", tz="UTC")  # both corrected at hour 1
    write_feedback(str(log_dir), [{"request_id": rid, "label": "positive", "sample": "random", "time": at}
                                  for rid in ("reused", "again")])
    rules = "[{name: hour, kind: live_quality, max_gap: 0.1, window: 1h, min_requests: 1}]"
    check = monitor_once(str(log_dir), monitor_params(tiny_model, f"monitor.rules={rules}"), now=START + 3 * 3600 - 1)
    assert check["live"]["n"] == 0, "a correction made at hour 1 was counted against a prediction of hour 2.5"
