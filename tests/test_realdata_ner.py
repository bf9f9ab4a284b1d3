"""Truth on real data: WNUT-17 emerging entities with bert-tiny, scored on the official test file."""

import shutil

import pandas as pd
import pytest

from kftune.config import load_params
from kftune.steps.evaluate import evaluate
from kftune.steps.finetune import finetune
from kftune.steps.ingest import ingest
from kftune.steps.tokenize import tokenize
from tests.conftest import ROOT, shared

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_bert_tiny_on_wnut17_beats_memorisation_on_the_test_file(tmp_path):
    train, test = shared("wnut17", "wnut17train.conll"), shared("wnut17", "emerging.test.annotated")
    params = load_params(ROOT / "params.yaml", [
        "task=token-classification", "model.name=bert-tiny", "finetune.learning_rate=1e-3", "finetune.epochs=5",
        "finetune.batch_size=32", "tokenize.max_length=64"])
    ingest(str(train), tmp_path / "data", params.ingest, task=params.task)
    ingest(str(test), tmp_path / "official", params.ingest, task=params.task)
    # score on the whole official test file; the baseline memorises the same training split
    scored = tmp_path / "scored"
    scored.mkdir()
    shutil.copy(tmp_path / "data" / "train.parquet", scored / "train.parquet")
    pd.concat([pd.read_parquet(tmp_path / "official" / f"{s}.parquet") for s in ("train", "validation", "test")]
              ).to_parquet(scored / "test.parquet")
    tokenize(tmp_path / "data", tmp_path / "tok", params.model.name, params.tokenize)
    summary = finetune(tmp_path / "tok", tmp_path / "model", params.model.name, params.finetune)
    m = evaluate(scored, tmp_path / "model", tmp_path / "eval", params.evaluate)
    model, memo = m["model"], m["baselines"]["memorization"]
    print(f"\nWNUT-17 test file ({m['test_rows']} sentences), bert-tiny: entity F1 {model['entity_f1']:.4f} "
          f"(P {model['precision']:.4f}, R {model['recall']:.4f}) vs memorisation {memo['entity_f1']:.4f}; "
          f"{summary['steps']} steps, {summary['examples_per_second']:.0f} windows/s")
    assert model["entity_f1"] > memo["entity_f1"] + 0.05
