"""Where alert events go: the log, a webhook (JSON POST, retried with back-off), the check's MLflow run."""

from __future__ import annotations

import json
import logging
import time

from kftune.config import MonitorConfig
from kftune.console import plain
from kftune.tracking import redact_url

log = logging.getLogger("kftune.monitor.alerts")
MAX_WAIT = 60.0  # seconds: the doubling waits between webhook attempts stop growing here


def post_webhook(url: str, document: dict, retries: int, backoff: float, timeout: float,
                 sleep=time.sleep) -> tuple[bool, str]:
    """POST `document` as JSON; retry on connection errors and 5xx/429 with doubling waits (at most MAX_WAIT).
    A redirect is not followed (it would turn the POST into a GET without the alert). Each attempt, from
    connecting to the last byte of the answer, has `timeout` seconds: a receiver that trickles its answer a
    byte at a time does not hold the check. (delivered, detail)."""
    import requests

    wait, last = backoff, ""
    for attempt in range(retries + 1):
        try:
            status = _post_within(url, document, timeout)
            if status < 300:
                return True, f"HTTP {status} after {attempt + 1} attempt(s)"
            last = f"HTTP {status}"
            if status < 500 and status != 429:
                return False, f"{last}: not retried (the receiver refused the document)"
        except (requests.RequestException, TimeoutError) as exc:
            last = type(exc).__name__
        if attempt < retries:
            sleep(wait)
            wait = min(wait * 2, MAX_WAIT)
    return False, f"{last} after {retries + 1} attempts"


def _post_within(url: str, document: dict, timeout: float) -> int:
    """One POST, answered within `timeout` seconds in all (requests' own timeout bounds each read, not the whole
    answer). On time-out the POST is left to its daemon thread, whose every read still times out: it ends when
    the receiver stops sending. A receiver that took the document and answered too late gets it again on the
    retry; dedupe on (alert, status, at)."""
    import threading

    import requests

    answer = {}

    def attempt():
        try:
            answer["status"] = requests.post(url, json=document, timeout=timeout, allow_redirects=False).status_code
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            answer["error"] = exc

    worker = threading.Thread(target=attempt, name="kftune-webhook", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no whole answer within {timeout:g} s")
    if "error" in answer:
        raise answer["error"]
    return answer["status"]


def deliver(events: list[dict], cfg: MonitorConfig, run_id: str = "", sleep=time.sleep) -> list[dict]:
    """Send every event to every configured sink; returns the events with a `delivery` record each."""
    out, url = [], cfg.webhook_target()
    for e in events:
        delivery = {}
        if "log" in cfg.sinks:
            (log.warning if e["status"] == "firing" else log.info)(
                "ALERT %s %s: %s", plain(e["alert"]), e["status"].upper(), plain(e["why"]))
            delivery["log"] = "logged"
        if "webhook" in cfg.sinks and url:
            ok, detail = post_webhook(url, {**e, "check_run_id": run_id}, cfg.webhook_retries,
                                      cfg.webhook_backoff_seconds, cfg.webhook_timeout_seconds, sleep)
            delivery["webhook"] = detail
            if not ok:
                log.error("alert %s %s: webhook %s undelivered: %s", plain(e["alert"]), e["status"],
                          redact_url(url), detail)
        if "mlflow" in cfg.sinks and run_id:
            import mlflow

            from kftune.tracking import key_part

            client = mlflow.MlflowClient()
            client.set_tag(run_id, f"kftune.alert.{key_part(e['alert'])}", e["status"])
            client.log_text(run_id, json.dumps(e, indent=2, default=str),
                            f"alerts/{key_part(e['alert'])}-{e['status']}.json")
            delivery["mlflow"] = run_id
        out.append({**e, "delivery": delivery})
    return out
