"""infra/: the manifests render with kustomize and validate against the Kubernetes schemas; the
compiled pipeline carries the image, resources, retries and Secrets a cluster needs."""

import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from kftune.config import load_params
from tests.conftest import ROOT

OVERLAYS = sorted(p.name for p in (ROOT / "infra" / "k8s" / "overlays").iterdir())


def render(overlay: str) -> list[dict]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with its built-in kustomize) is not installed; Debian package: kubectl")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "infra" / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_renders_and_validates(overlay):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("NetworkPolicy") == 3 and kinds.count("StatefulSet") == 2 and "Job" in kinds
    for doc in docs:
        kubernetes_validate.validate(doc, desired_version="1.37.0", strict=True)
        assert doc["metadata"].get("namespace", "kftune") == "kftune"
    for name in ("kftune-mlflow-ingress", "kftune-minio-ingress"):  # the InferenceService's predictor gets in
        policy = next(d for d in docs if d["metadata"]["name"] == name)
        assert any(f.get("podSelector", {}).get("matchExpressions") == [
            {"key": "serving.kserve.io/inferenceservice", "operator": "Exists"}]
            for rule in policy["spec"]["ingress"] for f in rule["from"])


CREDENTIALS = {  # (Secret, variable) -> optional: a pod starts without an optional key (plain AWS has no endpoint)
    ("kftune-mlflow", "MLFLOW_TRACKING_URI"): False, ("kftune-s3", "AWS_ACCESS_KEY_ID"): False,
    ("kftune-s3", "AWS_SECRET_ACCESS_KEY"): False,
    **{("kftune-mlflow", k): True for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                            "MLFLOW_TRACKING_TOKEN")},
    **{("kftune-s3", k): True for k in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_SESSION_TOKEN",
                                        "AWS_DEFAULT_REGION")}}


def secret_env(executor: dict) -> dict:
    return {(s["secretName"], k["envVar"]): s.get("optional", False) for s in executor["secretAsEnv"]
            for k in s["keyToEnv"]}


def test_secrets_are_placeholders_only():
    from kftune.config import WEBHOOK_ENV

    secrets = {doc["metadata"]["name"]: doc.get("stringData", {}) for doc in render("local") if doc["kind"] == "Secret"}
    for data in secrets.values():
        for key, value in data.items():
            assert value == "CHANGE-ME" or value.startswith("http") or key.endswith(("_USER", "_DB")), key
    cluster = load_params(ROOT / "params.yaml").cluster  # every Secret the pipelines read has a template
    assert {cluster.mlflow_secret, cluster.s3_secret, cluster.webhook_secret} <= set(secrets)
    assert secrets[cluster.webhook_secret] == {WEBHOOK_ENV: "CHANGE-ME"}


def test_cluster_pipeline_carries_image_resources_retries_and_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("KFTUNE_IMAGE", "registry.example.com/kftune:9.9")
    # the component modules read KFTUNE_IMAGE when imported: compile in a fresh interpreter
    out = tmp_path / "pipeline.yaml"
    subprocess.run([sys.executable, "-m", "kftune.cli", "compile", "-o", str(out), "--params", str(ROOT / "params.yaml"),
                    "-S", "cluster.finetune_gpus=2", "-S", "cluster.retries=3"], check=True, capture_output=True)
    spec, platform = yaml.safe_load_all(out.read_text())  # IR YAML: pipeline spec, then platform spec
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example.com/kftune:9.9"}
    resources = executors["exec-finetune-op"]["container"]["resources"]
    assert resources["resourceCpuLimit"] == "2" and resources["resourceMemoryLimit"] == "8G"
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "2"
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("ingest-op", "tokenize-op", "finetune-op", "evaluate-op"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 3
    assert "retryPolicy" not in tasks["register-op"], "a retried register would register a second version"
    assert spec["root"]["dag"]["tasks"]["condition-1"]["triggerPolicy"]["condition"].endswith("== 'promote'")
    env = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(env) == set(executors)
    for executor in env.values():
        assert secret_env(executor) == CREDENTIALS
    assert env["exec-finetune-op"]["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm",
                                                          "medium": "Memory"}], "two GPUs: NCCL needs /dev/shm"
    params_default = spec["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]
    assert "AWS_SECRET_ACCESS_KEY" not in out.read_text().split("platforms:")[0], "no credentials as parameters"
    assert params_default["cluster"]["finetune_gpus"] == 2


def test_cluster_retraining_pipeline_has_its_branches_retries_and_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("KFTUNE_IMAGE", "registry.example.com/kftune:9.9")
    out = tmp_path / "retraining.yaml"
    subprocess.run([sys.executable, "-m", "kftune.cli", "compile", "--pipeline", "retraining", "-o", str(out),
                    "--params", str(ROOT / "params.yaml")], check=True, capture_output=True)
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example.com/kftune:9.9"}
    root = spec["root"]["dag"]["tasks"]
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    train = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    condition = lambda tasks, name: tasks[name]["triggerPolicy"]["condition"]  # noqa: E731
    assert condition(root, "condition-1") == "inputs.parameter_values['pipelinechannel--resolve-op-Output'] != 'nothing-new'"
    assert condition(inner, "condition-2") == "inputs.parameter_values['pipelinechannel--drift-op-Output'] == 'retrain'"
    assert condition(train, "condition-3").endswith("['pipelinechannel--register-op-Output'] == 'promote'")
    assert "init_model" in train["finetune-op"]["inputs"]["artifacts"], "warm start from the champion export"
    for task in (root["resolve-op"], inner["drift-op"], train["finetune-op"], train["register-op"]):
        assert not task["cachingOptions"].get("enableCache"), "reads the registry or the latest data"
    for task in (root["resolve-op"], inner["drift-op"], train["tokenize-op"], train["finetune-op"]):
        assert task["retryPolicy"]["maxRetryCount"] == 2
    assert "retryPolicy" not in train["register-op"]
    assert executors["exec-finetune-op"]["container"]["resources"]["resourceMemoryLimit"] == "8G"
    env = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(env) == set(executors), "every task reads its credentials from Secrets"


def test_cluster_monitoring_and_batch_pipelines_take_credentials_from_secrets_never_the_webhook_url(tmp_path,
                                                                                                    monkeypatch):
    monkeypatch.setenv("KFTUNE_IMAGE", "registry.example.com/kftune:9.9")
    out = tmp_path / "monitoring.yaml"
    done = subprocess.run([sys.executable, "-m", "kftune.cli", "compile", "--pipeline", "monitoring", "-o", str(out),
                           "--params", str(ROOT / "params.yaml"), "-S", "monitor.sinks=[log, webhook]",
                           "-S", "monitor.webhook_url=https://hooks.example.com/services/T0/s3cret"],
                          check=True, capture_output=True, text=True)
    assert "s3cret" not in out.read_text() and "not compiled into the pipeline" in done.stderr
    spec, platform = yaml.safe_load_all(out.read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]["monitor"]["webhook_url"] == ""
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-monitor-op"]["secretAsEnv"]
    assert secret_env({"secretAsEnv": secrets}) == {**CREDENTIALS, ("kftune-webhook", "KFTUNE_WEBHOOK_URL"): True}
    out = tmp_path / "batch.yaml"
    subprocess.run([sys.executable, "-m", "kftune.cli", "compile", "--pipeline", "batch-predict", "-o", str(out),
                    "--params", str(ROOT / "params.yaml")], check=True, capture_output=True)
    spec, platform = yaml.safe_load_all(out.read_text())
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "registry.example.com/kftune:9.9"}
    assert set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == {"exec-batch-predict-op"}


def test_run_arguments_are_checked_against_the_pipeline_inputs(tmp_path):
    from kftune.cluster import ClusterError, compile_pipeline, pipeline_arguments

    params = load_params(ROOT / "params.yaml")
    training = compile_pipeline(params, tmp_path / "t.yaml", "training")
    data = {"data_path": "s3://b/batches"}
    assert pipeline_arguments(training, {"epochs": 1, **data}, "abc123") == {"git_commit": "abc123", "epochs": 1,
                                                                             **data}
    assert pipeline_arguments(training, {"epochs": "2", "learning_rate": "3e-5", "require_approval": "true",
                                         **data}) == {"epochs": 2, "learning_rate": 3e-5, "require_approval": True,
                                                      **data}
    assert pipeline_arguments(training, {"require_approval": "No", **data})["require_approval"] is False
    with pytest.raises(ClusterError, match=r"kftune-training needs -p data_path=\.\.\."):
        pipeline_arguments(training, {})
    with pytest.raises(ClusterError, match="-p epochs=two: kftune-training's input epochs is of type NUMBER_INTEGER"):
        pipeline_arguments(training, {"epochs": "two", **data})
    retraining = compile_pipeline(params, tmp_path / "r.yaml", "retraining")
    with pytest.raises(ClusterError, match="data_path='data/dataset' is a path on this machine and no -p data_repo"):
        pipeline_arguments(retraining, {})  # the default: this project's DVC dataset, which no pod has
    repo = {"data_repo": "https://git.example.com/ml/data.git"}
    assert pipeline_arguments(retraining, repo) == repo
    monitoring = compile_pipeline(params, tmp_path / "m.yaml", "monitoring")
    assert pipeline_arguments(monitoring, {"log_dir": "s3://b/log", "now": "17"}, "abc123") == {
        "log_dir": "s3://b/log", "now": 17.0}
    with pytest.raises(ClusterError, match=r"kftune-monitoring has no input epochs \(its inputs: log_dir, now, "
                                           r"params\)"):
        pipeline_arguments(monitoring, {"epochs": 1})
    with pytest.raises(ClusterError, match="log_dir='request-log' is a path on this machine; a pod reads an s3://.*"
                                           "-S serve.log_dir=s3://"):
        pipeline_arguments(monitoring, {})  # serve.log_dir's default: a folder beside `kftune serve`
    batch = compile_pipeline(params, tmp_path / "b.yaml", "batch-predict")
    with pytest.raises(ClusterError, match=r"kftune-batch-predict needs -p input_path=\.\.\."):
        pipeline_arguments(batch, {})


def test_local_pipeline_has_no_cluster_settings(tmp_path):
    from kfp import compiler

    from pipelines.training import create_pipeline

    compiler.Compiler().compile(create_pipeline(load_params(ROOT / "params.yaml").to_dict()), str(tmp_path / "p.yaml"))
    assert "platforms" not in (tmp_path / "p.yaml").read_text()


def test_submit_to_an_unreachable_endpoint_says_so(capsys):
    from kftune.cli import main

    assert main(["submit", "--host", "http://127.0.0.1:9", "--params", str(ROOT / "params.yaml")]) == 2
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in capsys.readouterr().err
