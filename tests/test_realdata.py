"""Truth on real data: Financial PhraseBank (sentences with 100% annotator agreement) with bert-tiny."""

import logging

import pytest

from kftune.config import load_params
from kftune.steps.evaluate import evaluate
from kftune.steps.finetune import finetune
from kftune.steps.ingest import ingest
from kftune.steps.tokenize import tokenize
from tests.conftest import ROOT, shared

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
log = logging.getLogger(__name__)


def test_bert_tiny_on_financial_phrasebank_beats_tfidf(tmp_path):
    source = shared("financial_phrasebank", "sentences_allagree.csv")
    params = load_params(ROOT / "params.yaml", [
        "model.name=bert-tiny", "finetune.learning_rate=1e-3", "finetune.epochs=6", "finetune.batch_size=16",
        "finetune.early_stopping_patience=2"])
    ingest(str(source), tmp_path / "data", params.ingest)
    tokenize(tmp_path / "data", tmp_path / "tok", params.model.name, params.tokenize)
    summary = finetune(tmp_path / "tok", tmp_path / "model", params.model.name, params.finetune)
    m = evaluate(tmp_path / "data", tmp_path / "model", tmp_path / "eval", params.evaluate)
    model_f1, tfidf_f1 = m["model"]["macro_f1"], m["baselines"]["tfidf_logreg"]["macro_f1"]
    print(f"\nPhraseBank allagree, bert-tiny: test macro-F1 {model_f1:.4f} vs TF-IDF {tfidf_f1:.4f} "
          f"({summary['examples_per_second']:.0f} train examples/s, {summary['steps']} steps)")
    assert model_f1 >= 0.80
    assert model_f1 > tfidf_f1
