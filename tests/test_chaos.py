"""Chaos soak: scheduled retraining cycles killed with SIGKILL at random (seeded) moments.

Each cycle is a real process that runs the retraining pipeline's components in order (resolve, drift,
tokenize, fine-tune, evaluate, register + gate, promote) on the project's DVC dataset, the way kfp.local
runs them minus one Python start per step: the processes are forked from one that imported torch,
transformers and mlflow once, so 20+ cycles fit in a few minutes (a real `kftune retrain` costs about
140 s on 2 loaded cores; tests/test_retraining.py kills one of those). Some cycles die at a random
moment, some at a registry write (KFTUNE_FAULT), some run to the end. After each, the next command's
pre-flight (check_dependencies: sweep dead runs, reconcile the registry) runs, then every invariant
of a trustworthy registry is checked.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kftune import registry
from kftune.config import load_params
from kftune.data import DATASET, add_batches
from kftune.local import check_dependencies
from tests.conftest import subword_texts

pytestmark = pytest.mark.slow

CYCLES, SEED = int(os.environ.get("KFTUNE_CHAOS_CYCLES", "22")), 12
FAULTS = ["intent", "champion", "previous", "tags", "history"]  # registry.py's kill points
FAST = ["retrain.cooldown_hours=0", "retrain.min_new_rows=1", "retrain.min_new_test_rows=1",
        "finetune.max_steps=60", "finetune.learning_rate=3e-3", "finetune.warmup_ratio=0.05", "finetune.threads=1",
        "finetune.eval_every_steps=30", "finetune.checkpoint_every_steps=10", "finetune.log_every_steps=10", "tokenize.max_length=24", "drift.permutations=20", "drift.max_rows=200",
        "register.min_delta=-1", "register.max_forgetting=0.99", "register.smoke_examples=2",
        "serve.agreement_rows=16", "evaluate.batch_size=128"]


class _Artifact:
    """What a component's body sees of an Input/Output artifact: a path and metadata."""

    def __init__(self, path: Path):
        self.path, self.metadata = str(path), {}

    def log_metric(self, key, value):
        self.metadata[key] = value


def cycle(project: Path, params: dict, out: Path, name: str) -> str:
    """One retraining run: the command's pre-flight, then the pipeline's own component functions in order."""
    from kftune.config import params_from_dict
    from kftune.fileio import single_instance

    with single_instance(project / ".kftune" / "retrain.lock", "retraining run"):  # as `kftune retrain` does
        check_dependencies(project, params_from_dict(params))
        return _steps(project, params, out, name)


def _steps(project: Path, params: dict, out: Path, name: str) -> str:
    from components.drift import drift_op
    from components.evaluate import evaluate_op
    from components.finetune import finetune_op
    from components.promote import promote_op
    from components.register import register_op
    from components.resolve import resolve_op
    from components.tokenize import tokenize_op

    a = {k: _Artifact(out / k) for k in ("data", "champion", "report", "tok", "model", "eval", "metrics", "gate")}
    status = resolve_op.python_func(data_path=DATASET, data_repo=str(project), data_rev="", params=params,
                                    run_name=name, data=a["data"], champion=a["champion"])
    if status == "nothing-new":
        return status
    if drift_op.python_func(data=a["data"], champion=a["champion"], params=params, force=True,
                            report=a["report"]) != "retrain":
        return "skip"
    tokenize_op.python_func(data=a["data"], params=params, tokenized=a["tok"])
    run_id = finetune_op.python_func(tokenized=a["tok"], params=params, model=a["model"], run_name=name,
                                     checkpoint_root=str(project / ".kftune" / "checkpoints"),
                                     init_model=a["champion"])
    evaluate_op.python_func(data=a["data"], model=a["model"], params=params, evaluation=a["eval"],
                            metrics=a["metrics"])
    decision = register_op.python_func(data=a["data"], model=a["model"], evaluation=a["eval"], params=params,
                                       run_id=run_id, git_commit="chaos", gate=a["gate"])
    if decision == "promote":
        promote_op.python_func(params=params, gate=a["gate"], run_name=name)
    return decision


def zygote() -> None:
    """Import once, then fork one process per cycle named on stdin; report its pid and how it ended."""
    import components.register  # noqa: F401  (mlflow, transformers, torch: everything a cycle imports)
    import kftune.steps.drift  # noqa: F401
    import kftune.steps.finetune  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            os.environ["KFTUNE_OWNER_PID"] = str(os.getpid())  # this process owns the runs it opens
            if job["fault"]:
                os.environ["KFTUNE_FAULT"] = job["fault"]
            try:
                result = cycle(Path(job["project"]), job["params"], Path(job["out"]), job["name"])
                print(json.dumps({"pid": os.getpid(), "result": result}), flush=True)
                os._exit(0)
            except BaseException as exc:  # noqa: BLE001  (a cycle may fail; the soak checks what it left)
                print(json.dumps({"pid": os.getpid(), "result": f"failed: {exc!r}"[:300]}), flush=True)
                os._exit(1)
        print(json.dumps({"started": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"ended": pid, "signal": os.WIFSIGNALED(status) and os.WTERMSIG(status)}), flush=True)


def _read(proc) -> dict:
    while True:
        line = proc.stdout.readline()
        assert line, f"the cycle process died: {proc.stderr.read()[-3000:]}"
        if line.startswith("{"):
            return json.loads(line)


def _assert_invariants(project: Path, name: str, dataset_md5: str) -> None:
    client = MlflowClient()
    assert registry.check(name) == [], "aliases, version tags and history agree"
    champion = registry.version_by_alias(name, registry.CHAMPION)
    if champion:
        moves = [e for e in registry.history(name) if e.action == "promote" and e.to_version == champion]
        assert moves and moves[-1].reason.startswith("passed the gate"), f"champion v{champion} passed the gate"
        gate = client.get_model_version(name, champion).tags
        assert gate["kftune.decision"] == "promoted", gate
    versions = client.search_model_versions(f"name='{name}'")
    assert all("kftune.decision" in mv.tags for mv in versions), "no version left undecided by a dead run"
    assert all(mv.status == "READY" for mv in versions), "no PENDING version"
    running = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 "attributes.status = 'RUNNING'")
    assert not running, f"runs left RUNNING: {[r.info.run_name for r in running]}"
    checkpoints = [d for d in (project / ".kftune" / "checkpoints").glob("*") if any(d.iterdir())]
    assert len(checkpoints) <= 1, f"checkpoint folders: {checkpoints}"
    assert _dataset_md5(project) == dataset_md5, "the data version is intact"
    dirty = subprocess.run(["git", "status", "--porcelain", "data"], cwd=project, capture_output=True, text=True)
    assert dirty.stdout == "", dirty.stdout


def _data_commit(project: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()


def _champion_data(name: str) -> str:
    champion = registry.version_by_alias(name, registry.CHAMPION)
    return MlflowClient().get_model_version(name, champion).tags.get("kftune.data_commit", "") if champion else ""


def _dataset_md5(project: Path) -> str:
    import yaml

    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        assert not repo.status([f"{DATASET}.dvc"]), "DVC says the data folder matches its .dvc file"
    return yaml.safe_load((project / f"{DATASET}.dvc").read_text())["outs"][0]["md5"]


def test_chaos_soak_scheduled_retraining_under_random_kills(project):
    params = load_params(project / "params.yaml", FAST)
    name, rng = params.register.model_name, random.Random(SEED)
    zyg = subprocess.Popen([sys.executable, "-c", "from tests.test_chaos import zygote; zygote()"], cwd=Path.cwd(),
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tally, started, batches, aimed = {"timed": 0, "fault": 0, "survived": 0}, time.monotonic(), 0, 0
    # how long a cycle takes that trains / that finds nothing new (updated as cycles end), so kills land inside
    took, pending, fault_kills = {}, False, []
    try:
        for i in range(CYCLES):
            if i % 3 == 0:  # new labelled data arrives now and then; most ticks retrain or find nothing new
                path = project.parent / f"batch-{batches}.csv"
                subword_texts(240, seed=100 + batches).to_csv(path, index=False)
                add_batches([str(path)], project, params.ingest, tag=f"b{batches}")
                batches, pending = batches + 1, True
            md5 = _dataset_md5(project)
            kind = rng.choices(["timed", "fault", "none"], weights=[6, 3, 2])[0]
            fault = rng.choice(FAULTS) if kind == "fault" else ""
            if fault and not pending:  # nothing to promote: the fault point would never be reached
                kind, fault = "timed", ""
            if ("train" if pending else "quick") not in took:  # how long such a cycle takes on this machine is
                kind, fault = "none", ""  # not known yet: let it run whole, so that later kills land inside one
            job = {"project": str(project), "params": params.to_dict(), "out": str(project.parent / f"c{i}"),
                   "name": f"chaos-{i}", "fault": fault}
            zyg.stdin.write(json.dumps(job) + "\n")
            zyg.stdin.flush()
            pid, t0 = _read(zyg)["started"], time.monotonic()
            if kind == "timed":  # anywhere in the cycle: pre-flight, a step, the registry writes
                aimed += 1
                time.sleep(rng.uniform(0.05, 0.95) * took["train" if pending else "quick"])
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            result, msg = "", _read(zyg)
            while "ended" not in msg:
                result, msg = msg.get("result", ""), _read(zyg)
            killed = msg["signal"] == signal.SIGKILL
            if not killed:
                key = "quick" if result == "nothing-new" else "train"  # the shortest seen: a kill lands in any
                took[key] = min(took.get(key, float("inf")), time.monotonic() - t0)
            elif fault:
                fault_kills.append(fault)
            assert killed or not result.startswith("failed"), f"cycle {i} failed on its own: {result}"
            tally["timed" if killed and kind == "timed" else "fault" if killed else "survived"] += 1
            print(f"cycle {i}: {kind} {fault} -> {'SIGKILL' if killed else result} after "
                  f"{time.monotonic() - t0:.1f} s", flush=True)
            check_dependencies(project, params)  # the next command: sweep dead runs, reconcile the registry
            _assert_invariants(project, name, md5)
            pending = _data_commit(project) != _champion_data(name)  # a held challenger's data is retrained
    finally:
        zyg.stdin.close()
        zyg.wait(timeout=60)
    wall = time.monotonic() - started
    print(f"chaos: {CYCLES} cycles, {tally}, registry kill points hit {fault_kills}, {wall:.0f} s, champion "
          f"v{registry.version_by_alias(name, registry.CHAMPION)}, {len(registry.history(name))} events")
    assert tally["timed"] >= 0.75 * aimed, f"{tally['timed']} of {aimed} timed kills landed inside a cycle"
    assert tally["timed"] + tally["fault"] >= CYCLES // 3, "a good share of the cycles was killed"
    assert registry.version_by_alias(name, registry.CHAMPION), "some cycle got a champion through the gate"
