"""infra/k8s/serving: the InferenceService renders, its pod validates against the Kubernetes schemas, and
its command, probes, port and Secrets are the ones `kftune serve` really uses."""

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from kftune.config import params_from_dict
from tests.conftest import ROOT
from tests.test_infra import CREDENTIALS

POD_FIELDS = ("containers", "volumes", "securityContext", "terminationGracePeriodSeconds", "serviceAccountName")


@pytest.fixture(scope="module")
def docs():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with its built-in kustomize) is not installed; Debian package: kubectl")
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                          str(ROOT / "infra" / "k8s" / "serving")], capture_output=True, text=True, check=True).stdout
    return {d["kind"]: d for d in yaml.safe_load_all(out) if d}


def test_inference_service_renders_and_its_pod_validates(docs):
    assert set(docs) == {"ConfigMap", "Secret", "InferenceService"}
    for kind in ("ConfigMap", "Secret"):
        kubernetes_validate.validate(docs[kind], desired_version="1.37.0", strict=True)
    isvc = docs["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["metadata"]["namespace"] == "kftune"
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {k: v for k, v in predictor.items() if k in POD_FIELDS}}
    kubernetes_validate.validate(pod, desired_version="1.37.0", strict=True)
    assert docs["Secret"]["stringData"] == {"tokens": "CHANGE-ME"}, "a placeholder only"


def test_the_container_runs_kftune_serve_with_the_projects_params(docs):
    from kftune.serving.__main__ import build_parser  # what `python -m kftune.serving` parses

    predictor = docs["InferenceService"]["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["command"] == ["python", "-m", "kftune.serving"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "serve" and args.alias == "champion" and args.host == "0.0.0.0"
    assert c["ports"][0]["containerPort"] == args.port
    params = yaml.safe_load(docs["ConfigMap"]["data"]["params.yaml"])
    assert params == yaml.safe_load((ROOT / "params.yaml").read_text()), "the project's params.yaml, not a copy"
    cfg = params_from_dict(params, args.set).serve
    assert cfg.log_dir.startswith("s3://")
    assert predictor["terminationGracePeriodSeconds"] > cfg.drain_seconds, "the drain finishes before SIGKILL"
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert c[probe]["httpGet"] == {"path": path, "port": args.port}
    env = {e["name"]: e for e in c["env"]}
    from_secrets = {(ref["name"], ref["key"]): ref.get("optional", False) for e in c["env"]
                    if (ref := e.get("valueFrom", {}).get("secretKeyRef"))}
    assert from_secrets == CREDENTIALS, "the Secrets' keys as the pipeline tasks read them (optional where optional)"
    token_file = env["KFTUNE_SERVE_TOKEN_FILE"]["value"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert token_file == f"{mounts['tokens']}/tokens" and volumes["tokens"]["secret"]["secretName"] == "kftune-serve-tokens"
    assert volumes["params"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"], "the generated, hashed name"
    assert args.params == f"{mounts['params']}/params.yaml"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
