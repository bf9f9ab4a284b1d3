"""Shared fixtures: a tiny random BERT built offline, small real data, an isolated MLflow store."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kftune.config import load_params

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`-n N`), give each worker its own share of the cores, inherited by every process
    it starts: kftune sizes torch's threads by the affinity, so N workers never run more compute threads
    than there are cores (oversubscribed, spinning OpenMP threads made the suite no faster than serial)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    cores = sorted(os.sched_getaffinity(0))
    if worker.startswith("gw") and 1 < count <= len(cores):
        os.sched_setaffinity(0, cores[int(worker[2:]) % count :: count])


_pin_xdist_worker()

POSITIVE_STEMS, NEGATIVE_STEMS = ["gain", "rise", "grow"], ["loss", "fall", "drop"]
NEW_POSITIVE_STEMS, NEW_NEGATIVE_STEMS = ["surge", "boom"], ["crash", "slump"]  # only in shifted data
FILLER = ["the", "group", "said", "quarter", "unit", "report", "today", "shares", "market", "board"]


SHIFTED_FILLER = ["token", "chain", "staking", "validator", "crypto", "wallet", "node", "bridge", "yield", "mint"]


def subword_texts(n: int, seed: int = 0, shifted: bool = False) -> pd.DataFrame:
    """Binary data where each text's signal word is unique: a stem plus a random suffix ("gainoku").

    Word-level TF-IDF never sees a test word in training, so the baseline sits near chance;
    a WordPiece model sees the shared stem as a sub-token and learns it in a few steps. This is
    the sub-word generalisation that makes an encoder worth fine-tuning, exaggerated for speed.
    `shifted` mostly uses stems the original data never has, draws the filler from words the tiny
    vocabulary lacks, and makes 80% of rows positive: a champion trained before the shift fails on it.
    """
    rng = np.random.default_rng(seed)
    letters = list("aeioukrstnm")
    rows = []
    for _ in range(n):
        positive = rng.random() < (0.8 if shifted else 0.5)
        new = shifted and rng.random() < 0.7
        stem = rng.choice({(True, False): POSITIVE_STEMS, (False, False): NEGATIVE_STEMS,
                           (True, True): NEW_POSITIVE_STEMS, (False, True): NEW_NEGATIVE_STEMS}[(positive, new)])
        word = stem + "".join(rng.choice(letters, size=4))
        words = list(rng.choice(SHIFTED_FILLER if shifted else FILLER, size=rng.integers(3, 9)))
        words.insert(int(rng.integers(0, len(words) + 1)), word)
        rows.append((" ".join(words), "positive" if positive else "negative"))
    return pd.DataFrame(rows, columns=["text", "label"])


def ner_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Tagged sentences for the tiny model: a `per` is one word on a positive stem ("gainoku"), an `org`
    two words on negative stems ("lossira dropmek"), every name unique, so memorising names fails
    and only the stems (sub-tokens) generalise."""
    rng = np.random.default_rng(seed)
    letters = list("aeioukrstnm")
    name = lambda stems: str(rng.choice(stems)) + "".join(rng.choice(letters, size=4))  # noqa: E731
    out = []
    for _ in range(n):
        tokens = [str(w) for w in rng.choice(FILLER, size=rng.integers(3, 8))]
        tags = ["O"] * len(tokens)
        for _ in range(rng.integers(1, 3)):
            at = int(rng.choice([i for i in range(len(tokens) + 1) if i == len(tokens) or tags[i][:2] != "I-"]))
            if rng.random() < 0.5:
                tokens[at:at], tags[at:at] = [name(POSITIVE_STEMS)], ["B-per"]
            else:
                tokens[at:at], tags[at:at] = [name(NEGATIVE_STEMS), name(NEGATIVE_STEMS)], ["B-org", "I-org"]
        out.append((tokens, tags))
    return out


def write_conll(path: Path, sentences) -> Path:
    path.write_text("\n\n".join("\n".join(f"{t}\t{g}" for t, g in zip(*s)) for s in sentences) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with a hand-built WordPiece vocabulary, saved as a folder.

    The vocabulary is explicit (the WordPiece trainer breaks ties differently from run to run) and
    the weights are seeded, so every session trains the same model to the same numbers.
    """
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    import torch
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    chars = string.ascii_lowercase + string.digits + string.punctuation
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE_STEMS, *NEGATIVE_STEMS, *FILLER,
             *chars, *(f"##{c}" for c in chars)]
    base_size = len(dict.fromkeys(words))
    words += [*NEW_POSITIVE_STEMS, *NEW_NEGATIVE_STEMS]
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    fast.save_pretrained(out)
    config = BertConfig(vocab_size=base_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.token_to_id("[PAD]"))
    torch.manual_seed(0)  # the same "pretrained" weights in every session, so outcomes are reproducible
    model = BertForMaskedLM(config)
    model.resize_token_embeddings(tok.get_vocab_size())  # the shifted-data stems, without moving any other weight
    model.save_pretrained(out)
    return str(out)


def tiny_params(tiny_model: str):
    """params.yaml with the tiny model and a short, fast training run."""
    return load_params(ROOT / "params.yaml", [
        f"model.name={tiny_model}", "finetune.max_steps=300", "finetune.batch_size=16", "finetune.learning_rate=2e-3",
        "finetune.warmup_ratio=0.05", "finetune.eval_every_steps=100", "finetune.bf16=false",
        "finetune.log_every_steps=10", "finetune.checkpoint_every_steps=0", "tokenize.max_length=32",
        "retrain.learning_rate=2e-3",  # the tiny random model needs its fresh rate for a warm start to move
        "register.model_name=tiny-test"])


@pytest.fixture
def params(tiny_model):
    return tiny_params(tiny_model)


@pytest.fixture
def subword_csv(tmp_path) -> Path:
    path = tmp_path / "subword.csv"
    subword_texts(1200).to_csv(path, index=False)
    return path


def use_mlflow_store(folder: Path, monkeypatch) -> str:
    """An isolated sqlite MLflow store in `folder`, exported the way the CLI exports it."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(folder)
    return uri


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    return use_mlflow_store(tmp_path, monkeypatch)


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data ships with the project's CI, not with the repo)")
    return path


@pytest.fixture
def prepared(tmp_path, params, subword_csv) -> Path:
    """Ingest + tokenize outputs for the sub-word data and the tiny model: tmp_path/{data,tokenized}."""
    from kftune.steps.ingest import ingest
    from kftune.steps.tokenize import tokenize

    ingest(str(subword_csv), tmp_path / "data", params.ingest)
    tokenize(tmp_path / "data", tmp_path / "tokenized", params.model.name, params.tokenize)
    return tmp_path


def with_changes(cfg, **changes):
    """A copy of a config section with some fields changed."""
    return dataclasses.replace(cfg, **changes)


def train_and_register(root, params, name, **finetune_changes):
    """fine-tune -> evaluate -> register on a `prepared` folder; returns (test metrics, the gate's verdict)."""
    from kftune.steps.evaluate import evaluate
    from kftune.steps.finetune import finetune
    from kftune.steps.register import register

    finetune(root / "tokenized", root / name, params.model.name, with_changes(params.finetune, **finetune_changes))
    metrics = evaluate(root / "data", root / name, root / f"{name}-eval", params.evaluate)
    decision = register(root / "data", root / name, root / f"{name}-eval", root / f"{name}-gate", params)
    return metrics, decision


def train_champion(root, params, data_dir, must_pass_gate: bool = True) -> str:
    """tokenize -> fine-tune -> evaluate -> register -> promote on a resolve output; returns the version.
    must_pass_gate=False promotes it whatever the gate said (a test whose subject is what comes after)."""
    from kftune import registry
    from kftune.gate import PROMOTE
    from kftune.steps.evaluate import evaluate
    from kftune.steps.finetune import finetune
    from kftune.steps.register import register
    from kftune.steps.tokenize import tokenize

    tokenize(data_dir, root / "tok", params.model.name, params.tokenize)
    finetune(root / "tok", root / "model", params.model.name, params.finetune)
    evaluate(data_dir, root / "model", root / "eval", params.evaluate)
    d = register(data_dir, root / "model", root / "eval", root / "gate", params)
    assert d.decision == PROMOTE or not must_pass_gate, d.reasons
    registry.promote(params.register.model_name, d.version, "test", expected_champion=d.champion_version)
    return d.version


BIN = str(Path(sys.executable).parent)


def sh(cwd, *cmd) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def project(tmp_path, params, monkeypatch, mlflow_store) -> Path:
    """A copy of this repository (code, dvc.yaml, .dvc/) in its own git repo, set up for the tiny model."""
    proj = tmp_path / "proj"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, proj / f)
    data = yaml.safe_load((proj / "params.yaml").read_text())
    data["model"]["name"] = params.model.name
    data["tokenize"]["max_length"] = 32
    data["finetune"].update(max_steps=200, batch_size=16, learning_rate=2e-3, eval_every_steps=100, bf16=False)
    data["retrain"]["learning_rate"] = 2e-3  # the tiny random model needs its fresh rate for a warm start to move
    data["register"]["model_name"] = params.register.model_name
    (proj / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (proj / ".venv").symlink_to(Path(BIN).parent)  # dvc.yaml runs .venv/bin/python, as in a clone after make install
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(proj)
    sh(proj, "git", "init", "-q", "-b", "main")
    sh(proj, "git", "config", "user.email", "ci@kftune.test")
    sh(proj, "git", "config", "user.name", "kftune tests")
    sh(proj, "git", "add", "-A")
    sh(proj, "git", "commit", "-qm", "kftune")
    for i in (0, 1):
        subword_texts(600, seed=10 + i).to_csv(tmp_path / f"batch{i}.csv", index=False)
    return proj


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (Debian's package, installed if missing)."""
    found = subprocess.run([str(ROOT / "infra" / "scripts" / "ensure-postgres.sh")], capture_output=True, text=True)
    if found.returncode:
        pytest.skip(f"no PostgreSQL server: {found.stderr.strip()}")
    bindir = Path(found.stdout.strip())
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    home = Path(tempfile.mkdtemp(prefix="kftune-pg-"))
    if as_user:
        shutil.chown(home, "postgres", "postgres")
    data, port = home / "data", free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "-A", "trust"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(home / "log"), "-o",
                    f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
