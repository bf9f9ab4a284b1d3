"""A tiny registered classifier (v1 champion) in its own MLflow store, a synthetic request log writer,
and a webhook receiver on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kftune import registry
from kftune.config import load_params
from kftune.serving.request_log import RequestLog, records
from tests.conftest import ROOT, ner_sentences, subword_texts, tiny_params, use_mlflow_store, with_changes, write_conll
from tests.serving.conftest import _register, _train

MODEL, TAGGER = "tiny-monitor", "tiny-monitor-ner"
FAST = ["drift.permutations=100", "drift.max_rows=300", "monitor.min_requests=50"]


@pytest.fixture(scope="session")
def monitor_store(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("monitor-store")
    base = tiny_params(tiny_model)
    clf = dataclasses.replace(base, register=with_changes(base.register, model_name=MODEL))
    subword_texts(300).to_csv(root / "texts.csv", index=False)
    with pytest.MonkeyPatch.context() as mp:
        use_mlflow_store(root, mp)
        _train(root / "clf", root / "texts.csv", clf, steps=8)
        registry.promote(MODEL, _register(root / "clf", clf), "monitor tests")
        ner = dataclasses.replace(base, task="token-classification",
                                  register=with_changes(base.register, model_name=TAGGER))
        _train(root / "ner", write_conll(root / "ner.conll", ner_sentences(150)), ner, steps=8)
        registry.promote(TAGGER, _register(root / "ner", ner), "monitor tests")
    return root


@pytest.fixture
def store(monitor_store, monkeypatch, tmp_path):
    """The session's store for this test, run from tmp_path (champion exports cache under it)."""
    use_mlflow_store(monitor_store, monkeypatch)
    monkeypatch.chdir(tmp_path)
    return monitor_store


def monitor_params(tiny_model: str, *overrides: str):
    return load_params(ROOT / "params.yaml", [f"model.name={tiny_model}", "register.model_name=" + MODEL,
                                              "finetune.bf16=false", *FAST, *overrides])


def write_traffic(log_dir: Path, start: float, hours: list[float], per_hour: int, seed: int = 0,
                  version: str = "1") -> list[dict]:
    """A request log of `per_hour` predictions per simulated hour; hours[i] is hour i's negative share.
    Written through the server's own RequestLog, one request per text."""
    rng = np.random.default_rng(seed)
    served = SimpleNamespace(name=MODEL, version=version, precision="fp32", task="sequence-classification",
                             labels=["negative", "positive"])
    texts = subword_texts(len(hours) * per_hour, seed=seed + 100)["text"].tolist()
    out = RequestLog(str(log_dir), 100000, 3600, 100000)
    rows = []
    for h, share in enumerate(hours):
        for j in range(per_hour):
            neg = rng.random() < share
            p = float(rng.uniform(0.55, 0.99))
            answer = {"label": "negative" if neg else "positive", "probability": p,
                      "probabilities": {"negative": p if neg else 1 - p, "positive": 1 - p if neg else p}}
            rid = f"r{h:02d}-{j:04d}"
            rows += records(rid, served, [texts[h * per_hour + j]], [answer], at=start + h * 3600 + j * 3600 / per_hour)
    out.append(rows)
    out.close()
    return rows


class Receiver:
    """An HTTP receiver on 127.0.0.1 that keeps every JSON document; the first `fail_first` POSTs get 503; with
    `redirect`, every POST gets a 302 to a page that answers a GET with 200 (what a moved endpoint does); with
    `trickle`, a 200 is sent one byte per `trickle` seconds (each read is quick, the whole answer is not)."""

    def __init__(self, fail_first: int = 0, redirect: bool = False, trickle: float = 0.0):
        self.documents, self.attempts, self.fail_first = [], 0, fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.attempts += 1
                if trickle:
                    outer.documents.append(json.loads(body))
                    try:
                        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":  # about 40 x trickle s
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(trickle)
                    except OSError:  # the sender gave up: what it should do
                        pass
                    self.close_connection = True
                    return
                if redirect:
                    self.send_response(302)
                    self.send_header("Location", "/moved")
                elif outer.attempts <= outer.fail_first:
                    self.send_response(503)
                else:
                    outer.documents.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    started = []

    def start(fail_first: int = 0, redirect: bool = False, trickle: float = 0.0) -> Receiver:
        started.append(Receiver(fail_first, redirect, trickle))
        return started[-1]

    yield start
    for r in started:
        r.stop()
