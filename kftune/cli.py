"""The `kftune` command: run and compile the pipelines, run single steps, manage the registry.

Parsing only: each subcommand maps onto functions in the package, imported when it runs, so
`kftune --help` starts without torch, mlflow or pandas.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

from kftune.cluster import PIPELINES
from kftune.config import KftuneError, load_params, params_help

DATASET = "data/dataset"  # kftune.data.DATASET, repeated so that --help imports nothing heavy


def _params(args):
    return load_params(args.params, args.set or [])


def _cluster_arguments(args) -> dict:
    """-p NAME=VALUE pipeline arguments (checked by _check_args), as text: kftune.cluster.pipeline_arguments
    types each one as the compiled pipeline's input is typed."""
    return dict(kv.split("=", 1) for kv in getattr(args, "param", None) or [])


# --- run / retrain / cluster ---------------------------------------------------------------

def cmd_run(args) -> int:
    from kftune import registry
    from kftune.console import plain
    from kftune.local import breakdown, run_local
    from kftune.tracking import configure

    params = _params(args)
    d = run_local(args.data or DATASET, params, args.project_dir, data_repo=args.data_repo or "",
                  data_rev=args.data_rev or "", verbose=args.verbose, runner=args.runner, image=args.image or "")
    uri = configure(args.project_dir)
    name = params.register.model_name
    print(f"\nregistered {name} v{d['version']}: {d['decision']}")
    print("  " + "\n  ".join(plain(r) for r in d["reasons"]))
    champion = registry.version_by_alias(name, registry.CHAMPION)
    print(f"champion: v{champion}\n" if champion else "champion: none\n")
    _print_versions(name)
    report = Path(d["report"]["run_dir"]) / "evaluate-op" / "evaluation" / "report.md"
    if report.exists():
        print(f"\n{plain(report.read_text(encoding='utf-8')).split('![')[0].strip()}\n(full report: {report})")
    print(f"\ntime per step:\n{breakdown(d['report'])}")
    print(f"\nbrowse runs and the registry: mlflow ui --backend-store-uri {uri} --workers 1 --port 5000")
    return 0


def cmd_retrain(args) -> int:
    from kftune.local import describe_outcome, run_retraining_local

    params = _params(args)
    o = run_retraining_local(params, args.project_dir, args.data or "", args.data_repo or "", args.data_rev or "",
                             force=args.force, verbose=args.verbose, runner=args.runner, image=args.image or "")
    print(f"\n{describe_outcome(o)}\n(MLflow run {o['run_id']} in experiment {params.register.experiment}-retraining)")
    return 0


def cmd_submit(args) -> int:
    from kftune.cluster import submit

    print(f"submitted: {submit(args.host, _params(args), _cluster_arguments(args), args.experiment, args.pipeline, args.image or '')}")
    return 0


def cmd_compile(args) -> int:
    from kftune.cluster import compile_pipeline

    print(f"wrote {compile_pipeline(_params(args), args.output, args.pipeline, args.image or '')}")
    return 0


def cmd_schedule(args) -> int:
    from kftune import cluster, schedule

    if args.action != "start":
        if not args.host:
            raise schedule.ScheduleError(f"schedule {args.action} manages KFP recurring runs: pass --host URL "
                                         f"(a local scheduler is stopped with Ctrl-C or SIGTERM)")
        for row in cluster.manage_on_cluster(args.host, args.action, args.id or ""):
            print("  ".join(f"{k}={v}" for k, v in row.items()))
        return 0
    if not args.cron:
        raise schedule.ScheduleError("schedule needs --cron, e.g. --cron '0 3 * * *'")
    schedule.check_cron(args.cron)
    params = _params(args)
    if args.host:  # a recurring run of the retraining pipeline, and of the monitoring one with --monitor
        runs = [("retraining", args.cron, _cluster_arguments(args))]
        if args.monitor:
            runs.append(("monitoring", schedule.check_cron(args.cron if args.monitor == "same" else args.monitor), {}))
        jobs = cluster.schedule_on_cluster(args.host, params, runs, args.experiment or "kftune", args.image or "")
        for job, (which, cron, _) in zip(jobs, runs):
            print(f"recurring run {job} ({which}): {cron!r}, max_concurrency=1, no catch-up")
        return 0
    from kftune.local import describe_outcome, run_retraining_local

    def job():
        return describe_outcome(run_retraining_local(params, args.project_dir, args.data or "", args.data_repo or "",
                                                     args.data_rev or "", verbose=args.verbose))

    tasks = [schedule.Task("retraining", args.cron, job)]
    if args.monitor:  # the check goes first on a shared fire time, so a drift alert precedes the retraining
        from kftune.monitor.cli import monitor_job
        from kftune.tracking import configure

        params.monitor.check_webhook()
        configure(args.project_dir)
        monitor_cron = args.cron if args.monitor == "same" else schedule.check_cron(args.monitor)
        tasks.insert(0, schedule.Task("monitor", monitor_cron, monitor_job(params, params.serve.log_dir,
                                                                           args.project_dir)))
    try:
        schedule.run_tasks(tasks, Path(args.project_dir) / ".kftune" / "schedule.lock")
    except KeyboardInterrupt:
        print("\nscheduler stopped", flush=True)
    return 0


def cmd_data(args) -> int:
    import tempfile

    from kftune.data import DataVersionError, add_batches

    params = _params(args)
    files = args.files
    with tempfile.TemporaryDirectory() as tmp:
        if args.action == "init":  # a fresh clone: a first data version from the demo generator
            from kftune.demo.data import write_batch

            if files:
                raise DataVersionError("data init takes no files; add your own with `kftune data add FILE`")
            if any((Path(args.project_dir) / DATASET).glob("batch-*")):
                raise DataVersionError(f"{DATASET} already holds data: `dvc pull` fetches it, "
                                       f"`kftune data add FILE` adds to it")
            files = [str(write_batch(tmp, 0, args.rows))]
        elif not files:
            raise DataVersionError("data add needs the batch files to add")
        result = add_batches(files, args.project_dir, params.ingest, tag=args.tag, push=not args.no_push,
                             task=params.task)
    print(f"added {', '.join(result['files'])} -> commit {result['commit'][:10]}"
          f"{' tag ' + result['tag'] if result['tag'] else ''}, dataset md5 {result['md5']}, "
          f"{'pushed to the DVC remote' if result['pushed'] else 'not pushed'}")
    print(f"train on this version: kftune run --data-rev {result['tag'] or result['commit'][:10]}")
    return 0


# --- step (one step from files, for DVC and debugging) -------------------------------------

def cmd_step(args) -> int:
    from kftune.base_models import hub_offline

    params = _params(args)
    hub_offline(params.model.name if args.name in ("tokenize", "finetune") else "")
    if args.name == "ingest":
        from kftune.steps.ingest import ingest

        split_files = {s: getattr(args, s) for s in ("train", "validation", "test") if getattr(args, s)}
        card = ingest(args.data, args.out, params.ingest, task=params.task, split_files=split_files or None)
        print(f"{card['rows']} dropped={card['dropped']} sha256={card['sha256'][:12]}")
    elif args.name == "tokenize":
        from kftune.steps.tokenize import tokenize

        tokenize(args.data, args.out, params.model.name, params.tokenize)
    elif args.name == "finetune":
        from kftune.steps.finetune import finetune, write_plots

        summary = finetune(args.data, args.out, params.model.name, params.finetune, checkpoint_dir=args.checkpoint_dir)
        if args.plots:
            write_plots(Path(args.out) / "training_history.json", args.plots)
        print(f"{summary['steps']} steps, {summary['precision']}, {summary['examples_per_second']:.1f} examples/s")
    elif args.name == "evaluate":
        from kftune.hardware import bf16_for
        from kftune.steps.evaluate import evaluate

        m = evaluate(args.data, args.model, args.out, params.evaluate, bf16_for(params.finetune))
        key, base = m["primary"], m["baseline"]
        print(f"test {key} {m['model'][key]:.4f} ({base} baseline {m['baselines'][base][key]:.4f})")
    elif args.name == "register":
        from kftune import gate
        from kftune.steps.register import register
        from kftune.tracking import configure, git_commit

        configure(args.project_dir)
        v = register(args.data, args.model, args.evaluation, args.out, params, git_commit=git_commit())
        if v.decision == gate.PROMOTE:
            gate.promote(params.register.model_name, v.version, "passed the gate (kftune step register)",
                         expected_champion=v.champion_version, keep_versions=params.register.keep_versions)
        print(f"v{v.version}: {v.decision}\n  " + "\n  ".join(v.reasons))
    return 0


# --- models --------------------------------------------------------------------------------

def _print_versions(name: str) -> None:
    from kftune import registry

    print(f"{'version':>7}  {'aliases':<30} {'decision':<18} {'test F1':>8}  created")
    for r in registry.list_versions(name):
        created = datetime.fromtimestamp(r["created"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
        print(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<30} {r['decision'] or '-':<18} "
              f"{r['score'] or '-':>8}  {created}")


def _event_versions(e) -> str:
    """A move reads `champion v1 -> v2`; a decision that moved nothing names the version and the champion kept."""
    if e.action in ("promote", "rollback", "moved-outside-kftune"):
        return f"champion v{e.from_version or '-'} -> v{e.to_version or '-'}"
    return f"v{e.to_version or '-'} (champion stays v{e.from_version or '-'})"


def cmd_models(args) -> int:
    from kftune import gate, registry
    from kftune.tracking import configure

    configure(args.project_dir)
    name = args.name or _params(args).register.model_name
    if args.action == "check":
        problems = registry.check(name)
        for p in problems:
            print(f"{name}: {p}")
        if problems and args.repair:
            for done in registry.reconcile(name):
                print(f"{name}: repaired: {done}")
            problems = registry.check(name)
        print(f"{name}: consistent" if not problems else f"{name}: {len(problems)} problem(s); "
              f"`kftune models check --repair` fixes what can be fixed")
        return 1 if problems else 0
    from kftune.tracking import sweep_dead_runs

    sweep_dead_runs()  # runs left RUNNING by a kftune command that was killed
    for done in registry.reconcile(name):  # a move a killed process left half done, or one made outside kftune
        print(f"{name}: {done}", file=sys.stderr)
    if args.action == "list":
        _print_versions(name)
    elif args.action == "prune":
        gone = registry.prune(name, args.keep)
        print(f"{name}: deleted {', '.join('v' + v for v in gone) or 'nothing'} (kept the newest {args.keep} and "
              f"every version behind an alias or awaiting approval)")
    elif args.action == "promote":
        event = gate.approve(name, args.version, args.reason, force=args.force,
                             keep_versions=_params(args).register.keep_versions)
        print(f"{name}: champion v{event.from_version or '-'} -> v{event.to_version}")
    elif args.action == "rollback":
        event = registry.rollback(name, args.reason)
        print(f"{name}: champion v{event.from_version} -> v{event.to_version} (rolled back)")
    elif args.action == "show":
        print(registry.describe_version(name, args.version))
    elif args.action == "history":
        events = registry.history(name)
        if not events:
            print(f"{name}: no promotions, holds or rollbacks recorded yet")
        for e in events:
            when = datetime.fromtimestamp(e.time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{when}  {e.action:<20} {_event_versions(e):<28} by {e.actor}\n    {e.reason}")
    return 0


def _shown(value) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value)
    return (text or '""') if len(text) <= 40 else text[:37] + "..."


def cmd_completion(args) -> int:
    from kftune.completion import bash_script

    if args.shell == "zsh":
        print("autoload -U +X bashcompinit && bashcompinit")
    print(bash_script(build_parser()))
    return 0


def cmd_params(args) -> int:
    from kftune.tracking import flatten, redacted

    values = flatten(redacted(_params(args).to_dict()))  # a credential shows where it points only
    shipped = Path(__file__).resolve().parents[1] / "params.yaml"  # the defaults kftune ships with
    if args.changed and not shipped.exists():
        raise KftuneError(f"--changed compares with kftune's own params.yaml, which is not at {shipped} (an install "
                          f"that is not editable: `pip install -e .` from the project keeps it beside the package)")
    defaults = flatten(redacted(load_params(shipped).to_dict())) if shipped.exists() else {}
    for key, text in params_help().items():
        value = values.get(key)
        if args.changed and key in defaults and defaults[key] == value:
            continue
        was = f"  (default {_shown(defaults[key])})" if args.changed and key in defaults else ""
        print(f"{key:<36} {_shown(value):<24} {text}{was}")
    return 0


def cmd_demo_data(args) -> int:
    from kftune.demo.data import write_batch

    print(f"wrote {write_batch(args.out, args.batch, args.rows, drift=args.drift, seed=args.seed)}")
    return 0


def cmd_demo_drift(args) -> int:
    from kftune.demo.drift import OVERRIDES, run_drift_demo

    run_drift_demo(args.workdir, load_params(args.params, OVERRIDES + [f"task={args.task}"] + (args.set or [])),
                   args.rows)
    return 0


# --- parser --------------------------------------------------------------------------------

def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. -S finetune.learning_rate=3e-5 (repeatable)")


def _add_data_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", help=what)
    p.add_argument("--data-rev", help="read --data at this git revision (tag, branch, commit) through DVC")
    p.add_argument("--data-repo", help="git repo (path or URL) holding the DVC-tracked data (default: this project)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kftune")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kftune", description=__doc__.split("\n")[0],
                                     epilog="`kftune COMMAND --help` describes each command, with examples.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; the full pipeline log on screen")
    parser.add_argument("--project-dir", default=".", help="where mlflow.db, mlartifacts and local_outputs live")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the training pipeline locally with kfp.local")
    _add_data_args(p, "CSV/TSV/JSONL/Parquet file, folder of them, CoNLL (token classification), or "
                      f"s3://bucket/prefix (default with --data-rev: {DATASET})")
    _add_params_args(p)
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="subprocess: each step in this Python environment (default); docker: each step in a "
                        "container of --image, against the tracking server in MLFLOW_TRACKING_URI")
    p.add_argument("--image", help="--runner docker: component image (default: $KFTUNE_IMAGE or kftune:0.1.0)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("retrain", help="run the retraining pipeline once locally: new data -> drift -> challenger -> gate")
    _add_data_args(p, f"the latest data (default: {DATASET} at the newest commit, through DVC)")
    p.add_argument("--force", action="store_true", help="train a challenger even without drift, enough new rows, "
                                                        "or during the cooldown")
    _add_params_args(p)
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="subprocess: each step in this Python environment (default); docker: each step in a "
                        "container of --image, against the tracking server in MLFLOW_TRACKING_URI")
    p.add_argument("--image", help="--runner docker: component image (default: $KFTUNE_IMAGE or kftune:0.1.0)")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("submit", help="compile and start a run on a Kubeflow Pipelines endpoint")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080 (port-forwarded)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="pipeline argument, e.g. -p data_path=s3://kftune-data/batches (repeatable)")
    p.add_argument("--experiment", default="kftune", help="KFP experiment, created if missing")
    p.add_argument("--image", help="component image (default: $KFTUNE_IMAGE or kftune:0.1.0)")
    p.add_argument("--pipeline", choices=PIPELINES, default="training", help="default: %(default)s")
    _add_params_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("schedule", help="scheduled retraining: a local cron loop, or a KFP recurring run with --host")
    p.add_argument("action", nargs="?", default="start", choices=["start", "list", "pause", "resume", "delete"])
    p.add_argument("id", nargs="?", help="recurring run id (pause, resume, delete)")
    p.add_argument("--cron", help="5-field cron, e.g. '0 3 * * *' (03:00 daily); missed runs are not caught up")
    p.add_argument("--host", help="KFP endpoint: create/manage a recurring run there instead of running locally")
    p.add_argument("--monitor", nargs="?", const="same", metavar="CRON",
                   help="local runs: also run `kftune monitor` checks of serve.log_dir, at --cron's times or this cron's")
    _add_data_args(p, f"local runs: the latest data (default: {DATASET} at the newest commit)")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="--host: pipeline argument")
    p.add_argument("--experiment", help="--host: KFP experiment (default: kftune)")
    p.add_argument("--image", help="--host: component image (default: $KFTUNE_IMAGE or kftune:0.1.0)")
    _add_params_args(p)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("data", help="versioned data: add a batch (DVC + git), or init a demo version on a fresh clone")
    p.add_argument("action", choices=["add", "init"],
                   help="add: the files as the next batches; init: a first version from the demo generator "
                        f"in {DATASET} (then `dvc repro` runs)")
    p.add_argument("files", nargs="*", help="labelled batch files, checked by ingest's rules before anything changes")
    p.add_argument("--rows", type=int, default=3000, help="init: rows of the demo batch (default: %(default)s)")
    p.add_argument("--tag", help="git tag for the new data version")
    p.add_argument("--no-push", action="store_true", help="do not `dvc push` even if a remote is configured")
    _add_params_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("compile", help="compile a pipeline for a cluster (KFP IR YAML)")
    p.add_argument("-o", "--output", default="pipeline.yaml", help="output file (default: %(default)s)")
    p.add_argument("--pipeline", choices=PIPELINES, default="training", help="default: %(default)s")
    p.add_argument("--image", help="component image for every task (default: $KFTUNE_IMAGE or kftune:0.1.0)")
    _add_params_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("step", help="run one step from files (used by DVC, handy for debugging)")
    p.add_argument("name", choices=["ingest", "tokenize", "finetune", "evaluate", "register"])
    p.add_argument("--data", help="input: raw data (ingest), ingest output (tokenize, evaluate, "
                                                 "register) or tokenize output (finetune)")
    p.add_argument("--model", help="fine-tune output (evaluate, register)")
    p.add_argument("--evaluation", help="evaluate output (register)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint-dir", help="finetune: resumable checkpoints (resumed if present)")
    p.add_argument("--plots", help="finetune: folder for train_loss.json and the validation score (DVC plots)")
    for split in ("train", "validation", "test"):
        p.add_argument(f"--{split}", help=f"ingest: the file of a given {split} split, instead of --data and the hash "
                                          f"split (a split not given is hashed out of --train)")
    _add_params_args(p)
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("models", help="the MLflow registry: list, show, promote, rollback, history, check, prune")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str, epilog: str = "") -> argparse.ArgumentParser:
        epilog = epilog or "examples:\n" + "\n".join(f"  {e}" for e in ACTION_EXAMPLES[name])
        a = actions.add_parser(name, help=help, description=help, epilog=epilog)
        a.add_argument("--name", help="registered model (default: register.model_name in params)")
        _add_params_args(a)
        a.set_defaults(func=cmd_models)
        return a

    action("list", "every version with its aliases, the gate's decision and test score")
    action("show", "one version: decision, reasons, lineage and the commands that reproduce it",
           "example:\n  kftune models show 3").add_argument("version", help="version number")
    a = action("promote", "make VERSION champion by hand (approve a version awaiting approval)",
               "example:\n  kftune models promote 3 --reason 'reviewed the report'")
    a.add_argument("version", help="version number")
    a.add_argument("--reason", required=True, help="why (recorded in the promotion history)")
    a.add_argument("--force", action="store_true", help="approve even if the champion moved since VERSION was gated")
    action("rollback", "point champion back at previous-champion",
           "example:\n  kftune models rollback --reason 'bad outputs in production'").add_argument(
        "--reason", required=True, help="why (recorded in the promotion history)")
    action("history", "every promotion, hold, rollback and outside move, oldest first")
    action("check", "aliases, version tags and history agree? (exit 1 if not); notices aliases moved in MLflow's UI"
           ).add_argument("--repair", action="store_true", help="finish interrupted moves, record outside moves")
    action("prune", "delete old versions and their weights (never one behind an alias or awaiting approval)"
           ).add_argument("--keep", type=int, default=5, help="versions to keep besides protected ones (default: 5)")

    p = sub.add_parser("params", help="every params.yaml key with its current value and meaning")
    p.add_argument("--changed", action="store_true", help="only the keys whose value differs from kftune's defaults")
    _add_params_args(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("completion", help="print a shell completion script: eval \"$(kftune completion bash)\"")
    p.add_argument("shell", choices=["bash", "zsh"], help="zsh uses the bash script through bashcompinit")
    p.set_defaults(func=cmd_completion)

    p = sub.add_parser("demo-data", help="write one batch of the synthetic financial-headline corpus")
    p.add_argument("--out", default="data/demo", help="folder (default: %(default)s)")
    p.add_argument("--batch", type=int, default=0, help="batch number; each batch has its own texts")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--drift", type=float, default=0.0, help="0 = i.i.d.; 1 = new entities, terms and class priors")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo-drift", help="watch the loop: i.i.d. batches, then a shifted one, retraining after each")
    p.add_argument("--workdir", default=".kftune/demo-drift", help="scratch git + DVC project (default: %(default)s; "
                                                                   "recreated)")
    p.add_argument("--rows", type=int, default=2000, help="rows per batch (default: %(default)s)")
    p.add_argument("--task", choices=["sequence-classification", "token-classification"],
                   default="sequence-classification", help="headlines to classify, or sentences to tag "
                                                           "(default: %(default)s)")
    _add_params_args(p)
    p.set_defaults(func=cmd_demo_drift)

    from kftune.serving.cli import add_commands
    add_commands(sub)
    from kftune.monitor.cli import add_commands as add_monitor_commands
    add_monitor_commands(sub)
    from kftune.score import add_commands as add_score_commands
    add_score_commands(sub)
    _document(sub)
    return parser


EXAMPLES = {
    "run": ["kftune run --data data/demo/batch-000.csv", "kftune run --data-rev data-v2 -S finetune.epochs=1"],
    "retrain": ["kftune retrain", "kftune retrain --data-rev data-v3 --force"],
    "compile": ["kftune compile -o pipeline.yaml", "KFTUNE_IMAGE=registry.example/kftune:1 kftune compile "
                "--pipeline retraining -o retraining.yaml"],
    "submit": ["kftune submit --host http://localhost:8080 -p data_path=s3://kftune-data/batches -p epochs=1"],
    "schedule": ["kftune schedule --cron '0 3 * * *'", "kftune schedule list --host http://localhost:8080"],
    "data": ["kftune data init", "kftune data add new-batch.csv --tag data-v2"],
    "step": ["kftune step evaluate --data work/data --model work/model --out work/eval"],
    "params": ["kftune params --changed -S finetune.epochs=1", "kftune params | grep finetune"],
    "completion": ['eval "$(kftune completion bash)"  # in ~/.bashrc', 'eval "$(kftune completion zsh)"  # in ~/.zshrc'],
    "models": ["kftune models list", "kftune models show 3", "kftune models check --repair"],
    "serve": ["kftune serve --model kftune-demo",
              "KFTUNE_SERVE_TOKEN=secret kftune serve --model kftune-demo --host 0.0.0.0 --port 8080 --precision fp32"],
    "predict": ["kftune predict --model kftune-demo --input new.csv --output predictions.parquet",
                "kftune predict --model kftune-demo/3 --input s3://bucket/texts.jsonl --output out.jsonl"],
    "score": ["kftune score --model kftune-demo --input golden.csv",
              "kftune score --model kftune-demo@previous-champion --input test.csv --train train.csv"],
    "monitor": ["kftune monitor --out monitor-report", "kftune monitor --cron '*/15 * * * *'"],
    "feedback": ["kftune feedback import corrections.csv --labeller support-team"],
    "label": ["kftune label queue --n 300 --out to-label", "kftune label import to-label/queue.csv --tag data-v3"],
    "demo-data": ["kftune demo-data --out data/demo --batch 1 --rows 2000 --drift 1.0"],
    "demo-drift": ["kftune demo-drift", "kftune demo-drift --task token-classification -S model.name=bert-tiny"],
    "demo-loop": ["kftune demo-loop", "kftune demo-loop --fast"],
}
ACTION_EXAMPLES = {
    "list": ["kftune models list", "kftune models list --name my-model"],
    "history": ["kftune models history"],
    "check": ["kftune models check", "kftune models check --repair"],
    "prune": ["kftune models prune --keep 3"],
}


def _document(sub) -> None:
    """Every subcommand (and models' actions): a description, examples, and the global options, which are
    accepted after the subcommand too (`kftune models list -v`)."""
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.description = p.description or (helps.get(name, "") and helps[name][0].upper() + helps[name][1:] + ".")
        if name in EXAMPLES and not p.epilog:
            p.epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[name])
        _add_globals(p)


def _add_globals(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("global options (before or after the subcommand)")
    # SUPPRESS: unless given here, the value parsed before the subcommand (or its default) stands
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    g.add_argument("--project-dir", default=argparse.SUPPRESS, help="where mlflow.db, mlartifacts and "
                                                                    "local_outputs live (default: .)")
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.formatter_class = argparse.RawDescriptionHelpFormatter
                _add_globals(child)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _check_args(parser, args) -> None:
    """What argparse cannot say; the error shows the subcommand's usage, not the top-level one."""
    def error(message):
        _subparser(parser, args.command).error(message)

    if args.command in ("submit", "schedule") and any("=" not in kv for kv in args.param or []):
        error(f"{args.command} -p takes NAME=VALUE")
    if args.command == "run" and not args.data and not args.data_rev:
        error("run needs --data FILE, or --data-rev REV to read the versioned dataset (kftune data init makes one)")
    if args.command == "step":
        needs = {"evaluate": ["model"], "register": ["model", "evaluation"]}.get(args.name, [])
        needs += [] if args.data or (args.name == "ingest" and args.train) else ["data"]
        missing = [f"--{n}" for n in needs if not getattr(args, n)]
        if missing:
            error(f"step {args.name} needs {' '.join(missing)}")
        if args.name == "ingest" and args.data and args.train:
            error("step ingest takes --data or --train/--validation/--test, not both")
    if args.command in ("run", "retrain") and args.image and args.runner != "docker":
        error("--image is the component image of --runner docker; without it the tasks run here")
    if args.command == "schedule" and args.action == "start":
        given = [flag for flag, value in (("--data", args.data), ("--data-repo", args.data_repo),
                                          ("--data-rev", args.data_rev)) if value] if args.host else \
            [flag for flag, value in (("-p", args.param), ("--experiment", args.experiment), ("--image", args.image))
             if value]
        if given:
            error(f"{', '.join(given)}: for "
                  f"{'local runs (a recurring run takes -p data_path=...)' if args.host else '--host'} only")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Our own handlers: a process started from a background shell inherits SIGINT as ignored, and
    # pods, `docker stop` and systemd stop a process with SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        return args.func(args)
    except KftuneError as exc:
        print(f"kftune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        name = str(exc) if str(exc) in signal.Signals.__members__ else "SIGINT"
        print(f"\nkftune: interrupted ({name})", file=sys.stderr)
        return 128 + signal.Signals[name].value  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    except BrokenPipeError:  # `kftune params | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        mlflow_errors = sys.modules.get("mlflow.exceptions")
        if mlflow_errors and isinstance(exc, mlflow_errors.MlflowException):
            print(f"kftune: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
