"""One MLflow store for the serving tests: a tiny text classifier (v1 champion, v2 challenger) and a tiny
NER tagger (v1 champion), trained and registered by the real steps, once per session."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from kftune import registry
from kftune.steps.evaluate import evaluate
from kftune.steps.finetune import finetune
from kftune.steps.ingest import ingest
from kftune.steps.register import register
from kftune.steps.tokenize import tokenize
from tests.conftest import (ROOT, free_port, ner_sentences, subword_texts, tiny_params, use_mlflow_store, with_changes,
                            write_conll)

CLASSIFIER, TAGGER = "tiny-serve", "tiny-ner"


def _train(root: Path, source: Path, params, steps: int) -> None:
    ingest(str(source), root / "data", params.ingest, task=params.task)
    tokenize(root / "data", root / "tok", params.model.name, params.tokenize)
    finetune(root / "tok", root / "model", params.model.name,
             with_changes(params.finetune, max_steps=steps, eval_every_steps=0))
    evaluate(root / "data", root / "model", root / "eval", params.evaluate)


def _register(root: Path, params) -> str:
    return register(root / "data", root / "model", root / "eval", root / f"gate-{time.monotonic_ns()}", params).version


@pytest.fixture(scope="session")
def serve_store(tmp_path_factory, tiny_model) -> Path:
    """The serving tests need registered versions with their reference rows, not good models: a few steps each.
    v2 of the classifier is the same weights registered again (a new version is what a swap follows)."""
    root = tmp_path_factory.mktemp("serve-store")
    base = tiny_params(tiny_model)
    clf = dataclasses.replace(base, register=with_changes(base.register, model_name=CLASSIFIER))
    ner = dataclasses.replace(base, task="token-classification",
                              register=with_changes(base.register, model_name=TAGGER))
    subword_texts(300).to_csv(root / "texts.csv", index=False)
    write_conll(root / "ner.conll", ner_sentences(150))
    with pytest.MonkeyPatch.context() as mp:
        use_mlflow_store(root, mp)
        _train(root / "clf", root / "texts.csv", clf, steps=8)
        registry.promote(CLASSIFIER, _register(root / "clf", clf), "serving tests")
        assert _register(root / "clf", clf) == "2"  # challenger
        _train(root / "ner", root / "ner.conll", ner, steps=60)  # enough to find entities: span checks run
        registry.promote(TAGGER, _register(root / "ner", ner), "serving tests")
    return root


class Server:
    """`kftune serve` in a subprocess on a free loopback port; always stopped by the fixture."""

    def __init__(self, store: Path, model: str, overrides: list[str], env: dict | None = None, log_dir: Path | None = None,
                 sigint_ignored: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir or store / f"request-log-{self.port}"
        self.stderr_path = store / f"serve-{self.port}.log"
        sets = [f"-S{o}" for o in ["serve.poll_seconds=0.5", "serve.max_wait_ms=20", f"serve.log_dir={self.log_dir}",
                                   "serve.log_flush_seconds=0.5", *overrides]]
        full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
                    **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kftune.serving", "--project-dir", str(store), "serve", "--model", model,
             "--port", str(self.port), "--params", str(ROOT / "params.yaml"), *sets],
            cwd=store, env=full_env, stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "wb"),
            start_new_session=True,
            # as from a background shell: the server must install its own SIGINT handler
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_server(serve_store):
    servers = []

    def start(model: str = CLASSIFIER, overrides: list[str] = (), env: dict | None = None, ready: bool = True,
              log_dir: Path | None = None, sigint_ignored: bool = False) -> Server:
        server = Server(serve_store, model, list(overrides), env, log_dir, sigint_ignored)
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
