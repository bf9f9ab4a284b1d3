"""The kftune command: bad input fails early with one clear message and leaves the registry alone."""

import os
import subprocess
import sys

import pytest
import yaml

from kftune import registry
from kftune.cli import main
from kftune.config import params_help
from tests.conftest import ROOT, train_and_register


@pytest.fixture
def project(prepared, params, mlflow_store):
    """A project folder with params.yaml for the tiny model and a registry holding champion v1."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["model"]["name"] = params.model.name
    data["register"]["model_name"] = params.register.model_name
    (prepared / "params.yaml").write_text(yaml.safe_dump(data))
    _, decision = train_and_register(prepared, params, "champion")
    registry.promote(params.register.model_name, decision.version, "first champion")
    return prepared


def _state(name):
    return registry.list_versions(name), registry.version_by_alias(name, registry.CHAMPION)


BAD_INPUTS = {
    "missing file": ("nope.csv", None, [], "nope.csv: no such file or folder"),
    "mis-encoded": ("bad.csv", b"text,label\ncaf\xe9,a\nup,b\n", [], "bad.csv:2: not valid utf-8"),
    "missing column": ("bad.csv", b"sentence,label\nup,a\n", [], "no text column 'text' (columns: sentence, label)"),
    "empty after cleaning": ("bad.csv", b"text,label\n  ,a\n,b\n", [], "no usable rows after cleaning"),
    "label outside the set": ("bad.csv", b"text,label\nup,a\ndown,c\n", ["-S", "ingest.labels=[a, b]"],
                              "labels outside ingest.labels ['a', 'b']: 'c' (1 rows)"),
    "one class": ("bad.csv", b"text,label\nup,a\ndown,a\n", [], "has 1 distinct label(s); need at least 2"),
    "empty split": ("bad.csv", b"text,label\nup,a\ndown,b\n", [], "split is empty with 2 rows"),
    "unknown model": ("good.csv", None, ["-S", "model.name=no-such-model"], "model.name='no-such-model' is not a packaged"),
    "invalid params value": ("good.csv", None, ["-S", "finetune.warmup_ratio=2"], "finetune.warmup_ratio=2.0: must be in [0, 1)"),
}


def test_bad_inputs_fail_before_training_and_leave_the_registry_alone(project, params, subword_csv, capsys):
    before = _state(params.register.model_name)
    for case, (name, content, extra, expected) in BAD_INPUTS.items():
        path = project / name
        if name == "good.csv":
            path = subword_csv
        elif content is not None:
            path.write_bytes(content)
        code = main(["--project-dir", str(project), "run", "--data", str(path), "--params",
                     str(project / "params.yaml"), *extra])
        err = capsys.readouterr().err
        assert code == 2, case
        assert expected in err, f"{case}: {err}"
        assert err.count("\n") <= 3, f"{case}: one clear message, not a traceback:\n{err}"
    assert _state(params.register.model_name) == before
    assert not (project / "local_outputs").exists(), "nothing may start before the input is known to be good"


def test_models_commands(project, params, capsys):
    name = params.register.model_name
    args = ["--project-dir", str(project), "models"]
    tail = ["--params", str(project / "params.yaml")]
    assert main([*args, "list", *tail]) == 0
    assert "champion" in capsys.readouterr().out
    assert main([*args, "rollback", "--reason", "test", *tail]) == 2
    assert "no previous-champion" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main([*args, "promote", "1", *tail])  # --reason is required
    assert done.value.code == 2 and "the following arguments are required: --reason" in capsys.readouterr().err
    assert main([*args, "promote", "1", "--reason", "again", *tail]) == 2
    assert "already the champion" in capsys.readouterr().err
    assert main([*args, "history", *tail]) == 0
    assert "first champion" in capsys.readouterr().out
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"


def test_params_lists_every_key_and_survives_a_closed_pipe(capsys):
    assert main(["params"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(params_help())
    proc = subprocess.run(f"{sys.executable} -m kftune.cli params | head -1", shell=True, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("task ") and proc.stderr == ""


def test_compile_writes_ir_yaml_with_the_image_given_on_every_task(tmp_path, capsys):
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "-o", str(out), "--params", str(ROOT / "params.yaml")]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "kftune-training"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"kftune:0.1.0"}
    assert main(["compile", "-o", str(out), "--pipeline", "retraining", "--image", "registry.example/kftune:7",
                 "--params", str(ROOT / "params.yaml")]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "registry.example/kftune:7"}, "the image is handed in when the pipeline is built, not read at import"
    assert main(["compile", "-o", str(tmp_path / "pipeline.json"), "--params", str(ROOT / "params.yaml")]) == 2
    assert "pipeline.json: a compiled pipeline is KFP IR YAML; name the file .yaml" in capsys.readouterr().err


def test_a_missing_folder_a_kfp_api_error_and_a_second_recurring_run_are_one_line_errors(tmp_path, capsys):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    assert main(["compile", "-o", str(tmp_path / "no" / "p.yaml"), "--params", str(ROOT / "params.yaml")]) == 2
    assert "the folder" in capsys.readouterr().err

    class KfpSaysNotFound(BaseHTTPRequestHandler):  # healthy; two pages of recurring runs, kftune's on the second
        def answer(self):
            listing = self.command == "GET" and self.path.startswith("/apis/v2beta1/recurringruns?")
            ok = "healthz" in self.path or listing
            second = "page_token=p2" in self.path
            body = json.dumps({"recurringRuns": [{"recurring_run_id": "r-1", "status": "ENABLED",
                                                  "display_name": "kftune-retraining-kftune-demo"}]} if second else
                              {"recurringRuns": [{"recurring_run_id": "r-0", "status": "ENABLED",
                                                  "display_name": "someone-elses"}], "next_page_token": "p2"}
                              if listing else
                              {"commit_sha": "x", "tag_name": "2.17.3", "multi_user": False} if ok else
                              {"error": "not found", "code": 5, "message": "recurring run BADID not found"}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = answer

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), KfpSaysNotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_port}"
        assert main(["schedule", "pause", "BADID", "--host", host]) == 2
        err = capsys.readouterr().err
        assert f"schedule pause BADID on {host}" in err and "HTTP 404" in err and "Traceback" not in err
        # a second recurring retraining of the same model would overlap the first: refused, naming it
        assert main(["schedule", "--cron", "0 3 * * *", "--host", host, "--params", str(ROOT / "params.yaml")]) == 2
        assert "already has the recurring run kftune-retraining-kftune-demo (id r-1" in capsys.readouterr().err
    finally:
        server.shutdown()


def test_version_and_global_options_after_the_subcommand(capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("kftune 0.")
    from kftune.cli import build_parser

    parser = build_parser()
    after = parser.parse_args(["models", "list", "-v", "--project-dir", str(tmp_path)])
    before = parser.parse_args(["-v", "--project-dir", str(tmp_path), "models", "list"])
    assert (after.verbose, after.project_dir) == (before.verbose, before.project_dir) == (True, str(tmp_path))
    plain = parser.parse_args(["models", "list"])
    assert (plain.verbose, plain.project_dir) == (False, "."), "the top-level defaults stand when not given"


def test_help_describes_each_command_and_errors_show_its_own_usage(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  kftune run --data" in out and "global options" in out
    with pytest.raises(SystemExit):
        main(["models", "list", "--help"])
    out = capsys.readouterr().out
    assert "--reason" not in out and "--force" not in out and "--keep" not in out, "list has only its own flags"
    with pytest.raises(SystemExit) as done:
        main(["run"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("usage: kftune run ") and "run needs --data" in err
    with pytest.raises(SystemExit) as done:
        main(["step", "ingest", "--data", "a.csv", "--train", "b.csv", "--out", "x"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "step ingest takes --data or --train/--validation/--test, not both" in err
    for argv, said in ((["run", "--data", "a.csv", "--image", "x:1"], "--image is the component image of --runner docker"),
                       (["schedule", "--cron", "0 3 * * *", "--host", "http://127.0.0.1:9", "--data-rev", "v3"],
                        "--data-rev: for local runs (a recurring run takes -p data_path=...) only"),
                       (["schedule", "--cron", "0 3 * * *", "-p", "epochs=1", "--experiment", "e"],
                        "-p, --experiment: for --host only")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2 and said in capsys.readouterr().err


def test_every_command_and_models_action_has_examples_that_parse():
    import shlex

    from kftune.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    actions = commands["models"]._subparsers._group_actions[0].choices
    checked = 0
    for name, p in [*commands.items(), *((f"models {a}", q) for a, q in actions.items())]:
        assert p.description, f"{name} has no description"
        assert p.epilog and p.epilog.startswith(("examples:", "example:")), f"{name} has no examples"
        for line in p.epilog.splitlines()[1:]:
            words = shlex.split(line.split("  #")[0].split(" | ")[0])
            while "=" in words[0]:  # VAR=value before the command
                words.pop(0)
            if words[0] == "kftune":  # an example that no longer parses would fail here, not in a user's shell
                parser.parse_args(words[1:])
                checked += 1
    assert checked >= 2 * len(commands)


def test_params_prints_values_and_changed_only_what_differs(capsys):
    assert main(["params", "--params", str(ROOT / "params.yaml"), "-S", "finetune.epochs=1"]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert lines["finetune.epochs"] == "1" and lines["model.name"] == "minilm-l6"
    assert main(["params", "--changed", "--params", str(ROOT / "params.yaml"), "-S", "finetune.epochs=1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("finetune.epochs") and line.endswith("(default 0)")
    # a webhook URL carries its token: shown as where it points, however short
    assert main(["params", "--changed", "--params", str(ROOT / "params.yaml"), "-S",
                 "monitor.webhook_url=https://h.io/T0K3N"]) == 0
    out = capsys.readouterr().out
    assert "https://h.io/..." in out and "T0K3N" not in out


def test_params_changed_outside_an_editable_install_says_why_it_cannot_compare(monkeypatch, tmp_path, capsys):
    import kftune.cli

    monkeypatch.setattr(kftune.cli, "__file__", str(tmp_path / "site-packages" / "kftune" / "cli.py"))
    assert main(["params", "--changed", "--params", str(ROOT / "params.yaml")]) == 2
    assert "not editable" in capsys.readouterr().err
    assert main(["params", "--params", str(ROOT / "params.yaml")]) == 0  # listing the values still works


def test_history_says_a_hold_moved_nothing():
    from kftune.cli import _event_versions

    held = registry.Event("hold", "m", "1", "2", "below the champion", "me@host", 0.0)
    moved = registry.Event("promote", "m", "1", "2", "passed the gate", "me@host", 0.0)
    assert _event_versions(held) == "v2 (champion stays v1)"
    assert _event_versions(moved) == "champion v1 -> v2"


def test_an_alias_moved_in_the_mlflow_ui_is_reported_then_recorded_by_the_next_command(mlflow_store, tmp_path,
                                                                                       capsys):
    from mlflow import MlflowClient

    client, name = MlflowClient(), "moved-by-hand"
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=(tmp_path / "weights").as_uri())
    registry.promote(name, "1", "first champion")
    client.set_registered_model_alias(name, registry.CHAMPION, "2")  # what MLflow's alias editor does
    common = ["--project-dir", str(tmp_path), "--name", name]
    assert main(["models", "check", *common]) == 1
    assert "champion is v2 but the history's last move is to v1 (moved outside kftune?)" in capsys.readouterr().out
    assert main(["models", "history", *common]) == 0  # any registry command notices and records it
    out = capsys.readouterr()
    assert "champion moved outside kftune: v1 -> v2; recorded" in out.err
    assert "moved-outside-kftune" in out.out and "champion v1 -> v2" in out.out and "by unknown (outside kftune)" in out.out
    assert main(["models", "check", *common]) == 0 and f"{name}: consistent" in capsys.readouterr().out


def test_pre_flight_checks_the_base_model_without_importing_torch(params, subword_csv, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    code = ("import sys\nfrom kftune.config import ConfigError, load_params\nfrom kftune.local import preflight\n"
            "p = load_params(sys.argv[1], ['finetune.freeze_layers=99'])\n"
            "try:\n    preflight(sys.argv[2], p)\nexcept ConfigError as e:\n    print(e)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "params.yaml"), str(subword_csv)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("finetune.freeze_layers=99:") and "has only 2 layers" in out[0], out
    assert out[-1] == "False", "pre-flight imported torch"


def test_the_parser_imports_nothing_heavy():
    """`kftune --help`, `--version` and a mistyped command answer at once: no pandas, torch or MLflow."""
    code = ("import sys\nfrom kftune.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('pandas', 'torch', 'mlflow', 'transformers', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bash_completion_completes_commands_actions_and_choices(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    probe = ('source /dev/stdin <<<"$KFTUNE_COMPLETION"\n'
             'c() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _kftune; echo "${COMPREPLY[*]}"; }\n'
             'c kftune mo; c kftune -v models pro; c kftune compile --pipeline ""; c kftune run --data ""; '
             'c kftune models list --pro; c kftune schedule ""; c kftune schedule list --ho; c kftune step ingest --da; '
             'c kftune completion ""')
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True,
                         env={"KFTUNE_COMPLETION": script, "PATH": os.environ["PATH"]}).stdout.splitlines()
    assert out[:5] == ["models monitor", "promote", "training retraining monitoring batch-predict", "", "--project-dir"]
    assert out[5].startswith("start list pause resume delete -h --help --cron") and out[6:8] == ["--host", "--data"]
    assert out[8].startswith("bash zsh -h")


def test_pipeline_arguments_are_name_value_pairs(capsys):
    from argparse import Namespace

    from kftune.cli import _cluster_arguments, main

    args = Namespace(param=["epochs=1", "data_path=s3://kftune-data/batches?x=y", "data_rev="])
    assert _cluster_arguments(args) == {"epochs": "1", "data_path": "s3://kftune-data/batches?x=y", "data_rev": ""}
    with pytest.raises(SystemExit):
        main(["submit", "--host", "http://127.0.0.1:9", "-p", "epochs=1", "-p", "data_path"])
    assert "submit -p takes NAME=VALUE" in capsys.readouterr().err


def test_steps_go_offline_unless_the_base_model_is_a_hub_id(monkeypatch, tmp_path):
    import os

    from kftune.base_models import hub_offline

    cases = (("", True), ("minilm-l6", True), (str(tmp_path), True), ("google/bert_uncased_L-2_H-128_A-2", False))
    for name, offline in cases:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        hub_offline(name)
        assert (os.environ.get("HF_HUB_OFFLINE") == "1") == offline, name
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub_offline("minilm-l6")
    assert os.environ["HF_HUB_OFFLINE"] == "0", "what the user set stands"


@pytest.mark.parametrize("why, code", [("SIGINT", 130), ("SIGTERM", 143), ("", 130)])
def test_an_interrupted_command_exits_128_plus_the_signal(monkeypatch, capsys, why, code):
    import kftune.cli

    def interrupted(args):
        raise KeyboardInterrupt(why)

    monkeypatch.setattr(kftune.cli, "cmd_params", interrupted)
    assert main(["params"]) == code
    assert f"kftune: interrupted ({why or 'SIGINT'})" in capsys.readouterr().err
