"""What the MLflow UI shows about a registered version: its model card, the run's description, the
experiment's kind, the evaluation report; and registering never reaches for the network."""

import json
import socket

import pytest
from mlflow import MlflowClient

from kftune import registry
from kftune.console import markdown_cell
from kftune.gate import HOLD, PROMOTE
from tests.conftest import train_and_register

LOCAL = {"localhost", "127.0.0.1", "::1", "", None}


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every attempt to resolve or connect to a host that is not this machine is recorded and refused."""
    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
            attempts.append(address)
            raise OSError(f"test: no network ({address})")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL:
            attempts.append(host)
            raise socket.gaierror(f"test: no network ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    import huggingface_hub.constants

    # the suite runs with HF_HUB_OFFLINE=1; here the hub is "online", so only kftune's own care keeps it away
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def test_a_registered_version_reads_as_a_model_card_without_any_network_call(prepared, params, mlflow_store,
                                                                            no_network, monkeypatch):
    monkeypatch.chdir(prepared)  # relative paths: the model folder must still not be taken for a hub id
    name = params.register.model_name
    first, v1 = train_and_register(prepared.relative_to(prepared), params, "good")
    assert v1.decision == PROMOTE
    registry.promote(name, v1.version, "gate", expected_champion="")
    _, v2 = train_and_register(prepared.relative_to(prepared), params, "bad", max_steps=2)
    assert v2.decision == HOLD
    assert no_network == [], f"registering tried the network: {no_network}"

    client = MlflowClient()
    card = client.get_model_version(name, "2").description
    assert card.startswith(f"# {name} v2\n")
    assert "**Gate: hold**" in card and "champion v1" in card
    for reason in v2.reasons:  # every reason, with its numbers, where the version page shows it
        assert markdown_cell(reason) in card
    assert f"| **this version** | " in card and f"{v2.challenger_score:.4f}" in card
    assert f"| champion v1 (re-scored now) |" in card and f"{v2.champion_score:.4f}" in card
    assert "| positive |" in card and "| negative |" in card, "per-class table"
    assert f"`{params.model.name}`" in card and "## Reproduce" in card and "## Known limits" in card
    assert len(card) <= 5000

    run = client.get_run(client.get_model_version(name, "2").run_id)
    assert "gate: **hold**" in run.data.tags["mlflow.note.content"]
    assert {"test_f1_positive", "test_f1_negative", "test_macro_f1"} <= set(run.data.metrics)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/evaluation.json", "evaluation/metrics.json"} <= artifacts
    assert "model_card.md" in {a.path for a in client.list_artifacts(run.info.run_id)}

    html = (prepared / "good-eval" / "report.html").read_text()
    assert '<img alt="confusion matrix" src="data:image/png;base64,' in html, "the image travels inside the page"
    flat = json.loads((prepared / "good-eval" / "metrics.json").read_text())
    assert list(flat)[0] == "macro_f1" and flat["macro_f1"] == round(first["model"]["macro_f1"], 4)
    assert all(isinstance(v, (int, float)) for v in flat.values()) and len(flat) <= 8


def test_a_card_for_150_labels_fits_the_registry_and_keeps_its_later_sections():
    from kftune.card import DESCRIPTION_LIMIT, model_card
    from kftune.gate import Verdict

    labels = [f"intent_{i:03d}" for i in range(150)]
    per = {lbl: {"precision": 0.9, "recall": 0.9, "f1": 0.5 + i / 400, "support": 10} for i, lbl in enumerate(labels)}
    scores = {"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.02}
    metrics = {"primary": "macro_f1", "baseline": "tfidf_logreg", "labels": labels, "test_rows": 1500,
               "model": {**scores, "per_class": per}, "baselines": {"tfidf_logreg": scores}}
    card = model_card("intents", "3", "minilm-l6", {"rows": {"train": 9000}, "sha256": "0" * 64}, metrics,
                      Verdict(PROMOTE, "3", challenger_score=0.9, baseline_score=0.8, reasons=["ok"]), "abc", "r1")
    assert len(card) < DESCRIPTION_LIMIT, len(card)
    assert "## Reproduce" in card and "weakest label: intent\\_000" in card and "(150 in all)" in card
    assert "| intent\\_019 |" in card and "| intent\\_020 |" not in card
    assert "The 20 weakest of 150 scored labels" in card


def test_a_card_shows_the_scores_the_gate_compared_and_skips_labels_with_nothing_to_score():
    """The champion trained on some test rows: the headline puts the two scores on the rows it never saw side by
    side, not this version's whole-split score against the champion's on fewer rows. A label with no test row and
    no prediction has no F1: it does not crowd out the weakest scored labels."""
    from kftune.card import model_card, run_description
    from kftune.gate import Verdict

    labels = [f"l{i:02d}" for i in range(25)]
    per = {lbl: ({"precision": 0.9, "recall": 0.9, "f1": 0.6 + i / 100, "support": 10, "predicted": 10} if i < 5 else
                 {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0})
           for i, lbl in enumerate(labels)}
    scores = {"accuracy": 0.9, "macro_f1": 0.91, "ece": 0.02}
    metrics = {"primary": "macro_f1", "baseline": "tfidf_logreg", "labels": labels, "test_rows": 500,
               "model": {**scores, "per_class": per}, "baselines": {"tfidf_logreg": {**scores, "macro_f1": 0.7}}}
    verdict = Verdict(HOLD, "4", challenger_score=0.91, baseline_score=0.7, champion_version="3", champion_score=0.89,
                      unseen_rows=120, challenger_unseen_score=0.88, reasons=["held"])
    card = model_card("m", "4", "minilm-l6", {"rows": {"train": 900}, "sha256": "0" * 64}, metrics, verdict, "c", "r")
    assert "**Gate: hold** — test macro_f1 0.8800 against champion v3 0.8900 on the 120 test rows the champion " \
           "never trained on." in card
    assert "| **this version**, on the same 120 rows | " in card and "it never trained on) |" in card
    assert "champion v3 0.8900 against this version's 0.8800 on the 120 test rows" in run_description(
        "4", "m", metrics, verdict)
    assert all(f"| l{i:02d} |" in card for i in range(5)), "every scored label is shown"
    assert "The 5 weakest of 5 scored labels (20 more had no test rows and no predictions)" in card
