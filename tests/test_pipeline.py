"""End to end: the KFP pipeline through kfp.local with the tiny model, the real registry and gate."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kftune import registry
from kftune.config import ModelConfig, load_params
from kftune.cluster import compile_pipeline
from kftune.local import PipelineFailed, run_local
from kftune.tables import DataError
from tests.conftest import ROOT, ner_sentences, train_and_register, write_conll

pytestmark = pytest.mark.slow


def test_compiled_pipeline_has_the_gate_image_and_caching(tmp_path, params):
    spec, _ = yaml.safe_load_all(compile_pipeline(params, tmp_path / "p.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"kftune:0.1.0"}
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["condition-1"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--register-op-Output'] == 'promote'")
    for name in ("ingest-op", "finetune-op", "register-op"):
        assert not tasks[name]["cachingOptions"].get("enableCache"), f"{name} reads external state"
    task_id = tasks["finetune-op"]["inputs"]["parameters"]["task_id"]["runtimeValue"]["constant"]
    assert task_id == "{{$.pipeline_task_uuid}}", "each attempt of the task knows its KFP task id"
    promote = spec["components"]["comp-condition-1"]["dag"]["tasks"]["promote-op"]
    assert not promote["cachingOptions"].get("enableCache"), "promote reads the registry"
    defaults = spec["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]
    assert defaults["finetune"]["max_steps"] == params.finetune.max_steps, "defaults come from params.yaml"


def test_pipeline_trains_registers_and_promotes_then_holds_a_worse_model(tmp_path, params, subword_csv, mlflow_store):
    name = params.register.model_name
    first = run_local(str(subword_csv), params, tmp_path)
    assert first["decision"] == "promote" and first["version"] == "1"
    # kfp.local has silently skipped dsl.If branches before: prove the promote task really ran
    promote_outputs = list(Path(tmp_path, "local_outputs").glob("*/promote-op/executor_output.json"))
    assert len(promote_outputs) == 1
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"
    events = registry.history(name)
    assert [e.action for e in events] == ["promote"] and " via pipeline kftune-training" in events[0].actor

    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["kftune.params_hash"] == params.digest() and tags["kftune.git_commit"], "through the settings task"
    assert MlflowClient().get_model_version(name, "1").description.startswith(f"# {name} v1\n"), "the model card"
    assert len(tags["kftune.data_sha256"]) == 64
    run = MlflowClient().get_run(tags["kftune.run_id"])
    assert run.data.metrics["test_macro_f1"] > 0.9 > run.data.metrics["baseline_tfidf_logreg_macro_f1"]
    assert re.fullmatch(r"[0-9A-Za-z-]+", run.data.tags["kftune.kfp_task_id"]), "the task id placeholder, filled in"
    assert "val_macro_f1" in run.data.metrics and "train_loss" in run.data.metrics
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/confusion_matrix.png", "evaluation/report.md"} <= artifacts

    worse = load_params(ROOT / "params.yaml", [f"model.name={params.model.name}", "finetune.max_steps=3",
                                                "finetune.bf16=false", "tokenize.max_length=32",
                                                f"register.model_name={name}"])
    second = run_local(str(subword_csv), worse, tmp_path)
    assert second["decision"] == "hold" and second["champion_version"] == "1"
    assert second["challenger_score"] < second["reference_score"]
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"
    assert registry.version_by_alias(name, registry.CHALLENGER) == "2"
    assert len(list(Path(tmp_path, "local_outputs").glob("*/promote-op/executor_output.json"))) == 1


def test_a_failing_step_leaves_the_champion_alone(prepared, params, subword_csv, mlflow_store):
    name = params.register.model_name
    _, decision = train_and_register(prepared, params, "champion")
    registry.promote(name, decision.version, "first champion")

    bad = prepared / "bad.csv"
    bad.write_text("text,sentiment\nup,a\n")
    with pytest.raises(DataError, match="no label column 'label'"):  # caught before any step starts
        run_local(str(bad), params, prepared)

    # a model folder without weights passes the pre-flight and breaks inside the fine-tune step
    broken = prepared / "broken-model"
    shutil.copytree(params.model.name, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(PipelineFailed, match="step fine-tune failed: .*model.safetensors"):
        run_local(str(subword_csv), dataclasses.replace(params, model=ModelConfig(str(broken))), prepared)
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"
    assert [v["version"] for v in registry.list_versions(name)] == ["1"]

    # the promote task run against a gate that held (a cluster's condition evaluated wrongly): it refuses
    from types import SimpleNamespace

    from components.promote import promote_op

    train_and_register(prepared, params, "held")
    gate = prepared / "held-gate"
    decision = json.loads((gate / "decision.json").read_text())
    (gate / "decision.json").write_text(json.dumps({**decision, "decision": "hold"}))
    with pytest.raises(RuntimeError, match="promote ran for a 'hold' decision"):
        promote_op.python_func(params=dataclasses.asdict(params), gate=SimpleNamespace(path=str(gate)), run_name="t")
    assert registry.version_by_alias(name, registry.CHAMPION) == "1"


def test_token_classification_pipeline_registers_a_tagger_that_returns_spans(tmp_path, params, mlflow_store):
    import mlflow

    from kftune.predict import predict_spans

    ner = dataclasses.replace(params, task="token-classification",
                              register=dataclasses.replace(params.register, model_name="tiny-ner"))
    decision = run_local(str(write_conll(tmp_path / "ner.conll", ner_sentences(1200))), ner, tmp_path)
    assert decision["decision"] == "promote" and decision["metric"] == "entity_f1"
    (metrics_file,) = Path(tmp_path, "local_outputs").glob("*/evaluate-op/evaluation/evaluation.json")
    m = json.loads(metrics_file.read_text())
    assert m["model"]["entity_f1"] > 0.8 and set(m["model"]["per_type"]) == {"org", "per"}
    assert m["baselines"]["memorization"]["entity_f1"] < 0.2, "every name is new: memorising names cannot work"
    assert decision["challenger_score"] == m["model"]["entity_f1"]

    parts = mlflow.transformers.load_model("models:/tiny-ner@champion", return_type="components")
    text = "The board said gainoku met lossira  dropmek today."
    (spans,) = predict_spans(parts["model"], parts["tokenizer"], [text])
    assert {"type": "per", "text": "gainoku", "start": 15, "end": 22} == {k: spans[0][k] for k in
                                                                           ("type", "text", "start", "end")}
    assert {w for e in spans if e["type"] == "org" for w in e["text"].split()} == {"lossira", "dropmek"}
    assert all(text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1 for e in spans)
