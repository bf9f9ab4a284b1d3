"""How long the read-only `kftune models` commands take on a registry of N versions, and how much of
that is importing MLflow (which every MLflow client pays before its first query).

Builds a throwaway sqlite store with N weightless versions and N history events, then times each
command as a fresh process (median of --repeat runs).

    .venv/bin/python benchmarks/cli_latency.py [--versions 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "cli-latency"


def build_store(work: Path, versions: int) -> None:
    from mlflow import MlflowClient

    from kftune import registry
    from kftune.tracking import configure

    configure(work)
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(versions):
        mv = client.create_model_version(NAME, source="file:///nonexistent", run_id=None)
        client.set_model_version_tag(NAME, mv.version, f"{registry.TAG}decision", "hold")
        registry.record("hold", NAME, None, mv.version, "below the champion")
    registry.promote(NAME, "1", "cli latency benchmark", expected_champion="")


def timed(argv: list[str], work: Path, repeat: int) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving_model import machine_line

    kftune = [sys.executable, "-m", "kftune.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_store(work, args.versions)
        rows = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "import mlflow": [sys.executable, "-c", "import mlflow"],
            "import mlflow + its SQLAlchemy stores": [sys.executable, "-c", "import mlflow.store.tracking."
                                                      "sqlalchemy_store, mlflow.store.model_registry.sqlalchemy_store"],
            "kftune --version": kftune + ["--version"],
            "kftune models list": kftune + ["models", "list", "--name", NAME],
            "kftune models history": kftune + ["models", "history", "--name", NAME],
            "kftune models check": kftune + ["models", "check", "--name", NAME],
        }
        print(f"{machine_line()}\n{args.versions} versions and history events, median of {args.repeat} runs\n")
        for label, argv in rows.items():
            print(f"{label:<40} {timed(argv, work, args.repeat):6.2f} s")


if __name__ == "__main__":
    main()
