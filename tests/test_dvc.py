"""Data versions with DVC: adding batches, running at a revision, dvc repro, remotes, lineage."""

import json
import os
import re
import shutil
import subprocess

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from kftune import registry
from kftune.cli import main
from kftune.config import load_params
from kftune.data import DataVersionError, add_batches
from kftune.local import preflight
from kftune.tables import DataError
from tests.conftest import BIN, ROOT, ner_sentences, sh, subword_texts, write_conll

pytestmark = pytest.mark.slow
def test_data_add_versions_the_dataset_and_old_revisions_stay_readable(project, params):
    first = add_batches([str(project.parent / "batch0.csv")], project, params.ingest, tag="data-v1")
    second = add_batches([str(project.parent / "batch1.csv")], project, params.ingest)
    assert first["files"] == ["data/dataset/batch-000.csv"] and second["files"] == ["data/dataset/batch-001.csv"]
    assert first["pushed"] and second["pushed"], "the default local remote receives every version"
    assert any((project / ".dvc-storage").rglob("*")), "objects are in the local remote"
    log = sh(project, "git", "log", "--format=%s")
    assert "data: add batch-001.csv (600 rows)" in log and "data: add batch-000.csv (600 rows)" in log

    old = preflight("data/dataset", params, str(project), "data-v1")
    new = preflight("data/dataset", params, str(project), "")
    alone = preflight(str(project.parent / "batch0.csv"), params)
    assert old["sha256"] == alone["sha256"] != new["sha256"]
    assert old["lineage"]["data_commit"] == first["commit"] and old["lineage"]["dvc_md5"] == first["md5"]


def test_a_revision_is_read_as_committed_and_a_bad_tag_is_refused_before_the_commit(project, params, tmp_path):
    first = add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    shutil.copy(project.parent / "batch1.csv", project / "data" / "dataset" / "left-over.csv")  # never committed
    read = preflight("data/dataset", params, str(project), "")
    assert read["lineage"]["data_commit"] == first["commit"] and read["lineage"]["data_rev"] == "HEAD"
    assert read["sha256"] == preflight(str(project.parent / "batch0.csv"), params)["sha256"], "HEAD, not the tree"
    (project / "data" / "dataset" / "left-over.csv").unlink()
    head = sh(project, "git", "rev-parse", "HEAD")
    with pytest.raises(DataVersionError, match="--tag 'data v2': not a valid git tag name"):
        add_batches([str(project.parent / "batch1.csv")], project, params.ingest, tag="data v2")
    assert sh(project, "git", "rev-parse", "HEAD") == head and sh(project, "git", "status", "--porcelain") == ""
    # a clone whose DVC cache was never pulled: one line saying so, not a traceback
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    shutil.rmtree(project / ".dvc-storage", ignore_errors=True)  # nor can its remote give the data
    with pytest.raises(DataError, match="run `dvc pull` there"):
        preflight("data/dataset", params, str(clone), "HEAD")


def test_a_bad_batch_changes_nothing(project, params):
    add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    head = sh(project, "git", "rev-parse", "HEAD")
    bad = project.parent / "bad.csv"
    bad.write_text("sentence,label\nup,a\n")
    with pytest.raises(DataError, match="no text column 'text'"):
        add_batches([str(project.parent / "batch1.csv"), str(bad)], project, params.ingest)
    assert sh(project, "git", "rev-parse", "HEAD") == head
    assert sorted(p.name for p in (project / "data" / "dataset").iterdir()) == ["batch-000.csv"]
    assert sh(project, "git", "status", "--porcelain") == ""
    # fine alone, but not with the dataset: its split column would leave the others' rows without one
    given = project.parent / "given.csv"
    given.write_text("text,label,split\nshares up,a,train\nshares down,b,test\n")
    with pytest.raises(DataError, match="some files have a 'split' column and some do not"):
        add_batches([str(given)], project, params.ingest)
    assert sh(project, "git", "rev-parse", "HEAD") == head and sh(project, "git", "status", "--porcelain") == ""
    assert sorted(p.name for p in (project / "data" / "dataset").iterdir()) == ["batch-000.csv"]


def test_two_data_adds_at_once_make_two_batches_and_two_commits(project, params):
    import threading

    add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    subword_texts(300, seed=12).to_csv(project.parent / "batch2.csv", index=False)
    head = sh(project, "git", "rev-parse", "HEAD")
    results, errors = [], []

    def add(name):
        try:
            results.append(add_batches([str(project.parent / name)], project, params.ingest, push=False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in ("batch1.csv", "batch2.csv")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and sorted(f for r in results for f in r["files"]) == [
        "data/dataset/batch-001.csv", "data/dataset/batch-002.csv"]
    assert sh(project, "git", "rev-list", "--count", f"{head.strip()}..HEAD").strip() == "2"
    assert sh(project, "git", "status", "--porcelain") == ""


def test_the_same_file_twice_is_refused_and_conll_batches_are_versioned(project, params):
    add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    with pytest.raises(DataError, match="already in the dataset as batch-000.csv"):
        add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    conll = write_conll(project.parent / "tags.conll", ner_sentences(50))
    bad = project.parent / "bad.conll"
    bad.write_text("Ann\tB-PER\nLee\tX-PER\n")
    with pytest.raises(DataError, match=f"{bad}:2: tag 'X-PER'"):
        add_batches([str(bad)], project, params.ingest, task="token-classification")
    added = add_batches([str(conll)], project, params.ingest, task="token-classification")
    assert added["files"] == ["data/dataset/batch-001.conll"] and added["rows"] == {str(conll): 50}


def test_a_dataset_not_pulled_is_not_overwritten_and_odd_batches_are_kept_readable(project, params):
    add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    shutil.rmtree(project / "data" / "dataset")  # a clone without `dvc pull`
    with pytest.raises(DataVersionError, match="not pulled, or changed by hand.*dvc pull"):
        add_batches([str(project.parent / "batch1.csv")], project, params.ingest)
    sh(project, f"{BIN}/dvc", "checkout", "-q", "data/dataset.dvc")
    one_label = project.parent / "positive.csv"  # a labelling round where every text was positive
    one_label.write_text("text,label\nprofit rose,positive\nsales up,positive\n")
    assert add_batches([str(one_label)], project, params.ingest)["files"] == ["data/dataset/batch-001.csv"]
    tagged = write_conll(project.parent / "more.annotated", ner_sentences(20))  # CoNLL under another suffix
    added = add_batches([str(tagged)], project, params.ingest, task="token-classification")
    assert added["files"] == ["data/dataset/batch-002.conll"]


def test_a_refused_commit_puts_the_working_tree_back(project, params):
    add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    hook = project / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'policy: no data commits today' >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(DataVersionError, match="policy: no data commits today"):
        add_batches([str(project.parent / "batch1.csv")], project, params.ingest)
    assert sh(project, "git", "status", "--porcelain") == ""
    assert sorted(p.name for p in (project / "data" / "dataset").iterdir()) == ["batch-000.csv"]
    with pytest.raises(DataVersionError, match="git tag 'v1' already exists"):
        hook.unlink()
        sh(project, "git", "tag", "v1")
        add_batches([str(project.parent / "batch1.csv")], project, params.ingest, tag="v1")
    assert sorted(p.name for p in (project / "data" / "dataset").iterdir()) == ["batch-000.csv"]


def test_unknown_revision_or_path_fails_before_training(project, params, capsys):
    add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    assert main(["--project-dir", str(project), "run", "--data-rev", "no-such-tag"]) == 2
    err = capsys.readouterr().err
    assert "no-such-tag" in err and str(project) in err
    assert main(["--project-dir", str(project), "run", "--data", "data/other", "--data-rev", "HEAD"]) == 2
    assert "'data/other' does not exist at revision 'HEAD'" in capsys.readouterr().err
    assert not (project / "local_outputs").exists()


def test_unreachable_remote_keeps_the_local_version(project, params, monkeypatch):
    sh(project, "dvc", "remote", "add", "-f", "-d", "broken", "s3://nowhere/dvc")
    sh(project, "dvc", "remote", "modify", "broken", "endpointurl", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(DataVersionError, match="push to the DVC remote failed") as err:
        add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    assert "local data is intact" in str(err.value)
    assert "data: add batch-000.csv" in sh(project, "git", "log", "-1", "--format=%s")
    assert (project / "data" / "dataset" / "batch-000.csv").is_file()


def without_venv_on_path(project) -> dict:
    """The environment of a shell where the venv is not activated: only its dvc is called by full path."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != BIN)
    return {**os.environ, "PATH": path}


def dvc(project, *args: str) -> str:
    proc = subprocess.run([f"{BIN}/dvc", *args], cwd=project, capture_output=True, text=True,
                          env=without_venv_on_path(project))
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_a_fresh_clone_gets_a_data_version_and_reproduces_without_kftune_on_path(project, capsys):
    assert "data/dataset" in dvc(project, "status")  # nothing to run on yet
    assert main(["--project-dir", str(project), "data", "init", "--rows", "400"]) == 0
    assert "train on this version" in capsys.readouterr().out
    assert (project / "data" / "dataset.dvc").is_file() and "data: add" in sh(project, "git", "log", "-1", "--format=%s")
    assert main(["--project-dir", str(project), "data", "init"]) == 2, "a second init refuses"
    dvc(project, "repro", "tokenize")
    assert (project / "work" / "tokenized").is_dir()


def test_dvc_repro_metrics_and_only_affected_stages_rerun(project, params):
    add_batches([str(project.parent / "batch0.csv")], project, params.ingest)
    dvc(project, "repro")  # no `kftune` on PATH: dvc.yaml runs the project's interpreter
    metrics = json.loads((project / "work" / "eval" / "metrics.json").read_text())
    assert list(metrics)[0] == "macro_f1" and metrics["macro_f1"] > 0.8
    assert all(isinstance(v, (int, float)) for v in metrics.values()), "flat numbers only: DVC shows each"
    shown = json.loads(sh(project, "dvc", "metrics", "show", "--json"))
    (entries,) = [d["data"]["work/eval/metrics.json"]["data"] for d in shown.values()]
    assert list(entries) == ["macro_f1", "accuracy", "ece", "majority_macro_f1", "tfidf_logreg_macro_f1",
                             "beats_tfidf_logreg_by", "test_rows"]
    details = json.loads((project / "work" / "eval" / "evaluation.json").read_text())
    assert details["model"]["per_class"]["positive"]["f1"] > 0.8, "per-class and baselines in evaluation.json"
    assert json.loads((project / "work" / "gate" / "decision.json").read_text())["decision"] == "promote"
    assert registry.version_by_alias(params.register.model_name, registry.CHAMPION) == "1"

    p = yaml.safe_load((project / "params.yaml").read_text())
    p["evaluate"]["ece_bins"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    stale = set(json.loads(sh(project, "dvc", "status", "--json")))
    assert stale == {"evaluate", "register"}, "changing evaluate.* must not re-run ingest, tokenize or fine-tune"

    ner_code = (project / "kftune" / "ner.py").read_text()
    (project / "kftune" / "ner.py").write_text(ner_code + "\n# changed\n")
    stale = set(json.loads(sh(project, "dvc", "status", "--json")))
    assert stale == {"ingest", "tokenize", "finetune", "evaluate", "register"}, "every stage that runs ner.py"
    (project / "kftune" / "ner.py").write_text(ner_code)

    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    sh(project, "dvc", "exp", "run", "-S", "finetune.learning_rate=1e-3")
    diff = sh(project, "dvc", "metrics", "diff", "--all", "--json")
    assert '"macro_f1"' in diff
    sh(project, "dvc", "plots", "diff", "--json")
    keep = re.search(r"^EXP_COLUMNS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    columns = sh(project, "dvc", "exp", "show", "--drop", ".*", "--keep", keep, "--csv").splitlines()[0].split(",")
    assert "macro_f1" in columns and "finetune.learning_rate" in columns and len(columns) <= 14, (
        f"`make exp` should show a handful of columns: {columns}")


def test_dvc_repro_for_token_classification(project, params):
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["task"] = "token-classification"
    p["register"]["model_name"] = "tiny-ner"
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (project / "data" / "dataset").mkdir(parents=True)
    write_conll(project / "data" / "dataset" / "ner.conll", ner_sentences(800))
    sh(project, "dvc", "repro")
    metrics = json.loads((project / "work" / "eval" / "metrics.json").read_text())
    assert list(metrics)[0] == "entity_f1" and metrics["entity_f1"] > 0.6
    assert {"sentence", "word", "label", "predicted"} <= set(
        (project / "work" / "eval" / "predictions.csv").read_text().splitlines()[0].split(","))
    assert json.loads((project / "work" / "gate" / "decision.json").read_text())["metric"] == "entity_f1"
    assert json.loads(sh(project, "dvc", "status", "--json")) == {}


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1: the same endpoint-URL + keys code path MinIO uses."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "kftune", "AWS_SECRET_ACCESS_KEY": "kftune-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=endpoint)
    for bucket in ("dvc", "mlflow"):
        client.create_bucket(Bucket=bucket)
    yield endpoint, client
    server.stop()


def test_s3_remote_and_artifacts_with_lineage_from_a_run_at_a_revision(project, params, s3, monkeypatch, capsys):
    endpoint, client = s3
    sh(project, "dvc", "remote", "add", "-f", "-d", "minio", "s3://dvc/store")
    sh(project, "dvc", "remote", "modify", "minio", "endpointurl", endpoint)
    sh(project, "git", "commit", "-qam", "dvc remote on S3")
    v1 = add_batches([str(project.parent / "batch0.csv")], project, params.ingest, tag="data-v1")
    add_batches([str(project.parent / "batch1.csv")], project, params.ingest)
    assert v1["pushed"] and client.list_objects_v2(Bucket="dvc")["KeyCount"] > 0

    shutil.rmtree(project / ".dvc" / "cache")
    (project / "data" / "dataset" / "batch-000.csv").unlink()
    sh(project, "dvc", "pull", "data/dataset.dvc")
    assert (project / "data" / "dataset" / "batch-000.csv").is_file(), "dvc pull restores from S3"

    monkeypatch.setenv("KFTUNE_ARTIFACT_ROOT", "s3://mlflow/artifacts")
    monkeypatch.setenv("KFTUNE_GIT_COMMIT", sh(project, "git", "rev-parse", "HEAD").strip())
    assert main(["--project-dir", str(project), "run", "--data-rev", "data-v1"]) == 0
    name = params.register.model_name
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["kftune.data_commit"] == v1["commit"] and tags["kftune.dvc_md5"] == v1["md5"]
    assert tags["kftune.data_rev"] == "data-v1" and tags["kftune.data_path"] == "data/dataset"
    assert tags["kftune.data_sha256"] == preflight(str(project.parent / "batch0.csv"), load_params())["sha256"]
    run = MlflowClient().get_run(tags["kftune.run_id"])
    assert {i.dataset.name.split("-")[0] for i in run.inputs.dataset_inputs} == {"train", "test"}
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="mlflow", MaxKeys=1000).get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys), "the model went to the S3 artifact store"

    capsys.readouterr()
    assert main(["--project-dir", str(project), "models", "show", "1"]) == 0
    out = capsys.readouterr().out
    assert f"git checkout {os.environ['KFTUNE_GIT_COMMIT']}" in out
    assert f"kftune run --data data/dataset --data-rev {v1['commit']}" in out


def test_a_relative_data_repo_is_made_absolute_for_the_tasks(tmp_path, monkeypatch):
    """Tasks (containers too) run in other folders: `--data-repo ../repo` must name the same repo there."""
    from kftune.local import _data_location

    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _data_location("data/dataset", tmp_path, "repo", "v1") == ("data/dataset", str(tmp_path / "repo"))
    assert _data_location("data/dataset", tmp_path, "https://example.com/r.git", "") == (
        "data/dataset", "https://example.com/r.git")
