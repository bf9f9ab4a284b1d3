"""The kftune command: bad input fails early with one clear message and leaves the registry alone."""

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
    with pytest.raises(SystemExit):
        main([*args, "promote", "1", *tail])  # --reason is required
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
