"""Load on `kftune serve`: throughput and latency at 1, 8 and 32 concurrent clients, then a promotion under load.

The server runs MiniLM-L6 fine-tuned on Financial PhraseBank (see serving_model.py) from a local MLflow
store, on 127.0.0.1, at the precision `serve.precision=auto` picks on this machine. Each client sends
one test text per request (KServe V1) on a keep-alive connection, as fast as answers come back, for
`--seconds` per level. Then v2 is promoted while 8 clients keep sending: the server loads and warms it
beside v1 and swaps; the run reports failed requests (the goal is zero) and how long the swap took.
The clients share the server's CPU, so on a small machine they cost it throughput.

    .venv/bin/python benchmarks/serve_load.py [--seconds 15] [--work .kftune/bench-serving]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

from serving_model import NAME, ROOT, machine_line, prepare, register_versions  # benchmarks/ is on sys.path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, texts: list[str], clients: int, seconds: float, until=None) -> dict:
    """`clients` threads sending for `seconds` (or until `until(results)` is true); latencies and outcomes."""
    results, stop = [], threading.Event()

    def client(seed):
        rng, session = random.Random(seed), requests.Session()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = session.post(url, json={"instances": [rng.choice(texts)]}, timeout=60)
                results.append((time.perf_counter() - t0, r.status_code, r.json().get("model_version")))
            except (requests.RequestException, ValueError) as exc:
                results.append((time.perf_counter() - t0, type(exc).__name__, None))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    while time.perf_counter() - start < seconds and not (until and until(results)):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array([r[0] for r in results if r[1] == 200]) * 1000
    pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
    return {"clients": clients, "seconds": wall, "ok": len(lat), "errors": len(results) - len(lat),
            "rps": len(lat) / wall, "p50": pct[0], "p95": pct[1], "p99": pct[2],
            "versions": sorted({r[2] for r in results if r[2]}), "results": results}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=".kftune/bench-serving")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    _, texts = prepare(work, args.steps)
    uri = register_versions(work, args.steps)
    from kftune import registry

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_file = open(work / "serve.log", "wb")
    cmd = [sys.executable, "-m", "kftune.serving", "--project-dir", str(work), "serve", "--model", NAME,
           "--port", str(port), "--params", str(ROOT / "params.yaml"), "-Sserve.poll_seconds=2",
           "-Sserve.agreement_rows=256", f"-Sserve.log_dir={work / 'request-log'}"]
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=log_file,
                              start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: see {work / 'serve.log'}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        meta = requests.get(f"{url}/v2/models/{NAME}").json()["parameters"]
        print(f"machine: {machine_line()}")
        print(f"server ready in {time.perf_counter() - t0:.0f} s, serving v1 at {meta['precision']}: "
              f"{meta['precision_reason']}\n")
        print(f"{'clients':>7} {'seconds':>7} {'requests/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
        predict = f"{url}/v1/models/{NAME}:predict"
        for clients in (1, 8, 32):
            r = load(predict, texts, clients, args.seconds)
            print(f"{clients:>7} {r['seconds']:>7.1f} {r['rps']:>10.1f} {r['p50']:>8.0f} {r['p95']:>8.0f} "
                  f"{r['p99']:>8.0f} {r['errors']:>6}", flush=True)
        print(f"load average after the levels: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        current = registry.version_by_alias(NAME, registry.CHAMPION)
        target = "2" if current == "1" else "1"
        promoted_at = time.perf_counter()
        (registry.promote if target == "2" else registry.rollback)(NAME, *(["2"] if target == "2" else []),
                                                                   "serving benchmark: promotion under load")
        swapped = lambda res: any(v == target for _, _, v in res[-8:])  # noqa: E731
        r = load(predict, texts, 8, 300, until=swapped)
        took = time.perf_counter() - promoted_at
        served = [v for _, _, v in r["results"]]
        print(f"\npromotion v{current} -> v{target} under 8 clients: answers from v{target} after {took:.0f} s; "
              f"{r['ok']} requests answered ({served.count(current)} by v{current}, {served.count(target)} by "
              f"v{target}), {r['errors']} failed; p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms during the swap")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        print(f"server stopped on SIGTERM with exit code {code}; log: {Path(args.work) / 'serve.log'}")


if __name__ == "__main__":
    main()
