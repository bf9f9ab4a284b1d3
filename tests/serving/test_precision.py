"""The precision rule on made-up numbers, and the measurement on a real registered tiny model."""

import pytest

from kftune.config import load_params
from kftune.serving.model import held_out_texts, load_version
from kftune.serving.precision import choose_precision, convert, measure_precisions
from tests.conftest import ROOT, use_mlflow_store
from tests.serving.conftest import CLASSIFIER, TAGGER


def m(agreement, speed):
    return {"agreement": agreement, "texts_per_s": speed}


def test_auto_serves_the_fastest_precision_that_agrees_enough():
    measured = {"fp32": m(1.0, 100), "bf16": m(0.999, 180), "int8": m(0.997, 250)}
    choice = choose_precision("auto", measured, 0.995)
    assert choice.value == "int8" and "2.50x fp32" in choice.reason and "bf16 180 texts/s" in choice.reason


def test_auto_skips_a_faster_precision_below_the_agreement_bar():
    measured = {"fp32": m(1.0, 100), "bf16": m(0.999, 180), "int8": m(0.98, 250)}
    choice = choose_precision("auto", measured, 0.995)
    assert choice.value == "bf16" and "below the agreement bar: int8" in choice.reason


def test_auto_keeps_fp32_when_nothing_else_is_faster_and_a_fixed_setting_is_kept():
    assert choose_precision("auto", {"fp32": m(1.0, 100), "int8": m(1.0, 90)}, 0.995).value == "fp32"
    assert choose_precision("int8", {}, 0.995).value == "int8"


def test_measure_on_the_versions_own_held_out_rows(serve_store, monkeypatch):
    import mlflow
    import torch

    use_mlflow_store(serve_store, monkeypatch)
    texts = held_out_texts(CLASSIFIER, "1", 30)
    assert len(texts) == 30
    parts = mlflow.transformers.load_model(f"models:/{CLASSIFIER}/1", return_type="components")
    out = measure_precisions(parts["model"], parts["tokenizer"], texts, precisions=["fp32", "int8"], batch_size=8)
    assert out["fp32"]["agreement"] == 1 and 0 <= out["int8"]["agreement"] <= 1
    assert all(v["texts_per_s"] > 0 for v in out.values())
    quantised = convert(parts["model"], "int8")
    assert any(isinstance(x, torch.ao.nn.quantized.dynamic.Linear) for x in quantised.modules())
    assert convert(parts["model"], "bf16").dtype == torch.bfloat16 and parts["model"].dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        convert(parts["model"], "fp8")


def test_load_version_records_the_choice_on_the_version(serve_store, monkeypatch):
    from mlflow import MlflowClient

    use_mlflow_store(serve_store, monkeypatch)
    cfg = load_params(ROOT / "params.yaml", ["serve.agreement_rows=20", "serve.max_batch=8"]).serve
    served = load_version(TAGGER, "1", cfg)
    tags = MlflowClient().get_model_version(TAGGER, "1").tags
    assert tags["kftune.serve.precision"] == served.precision and served.task == "token-classification"
    assert set(served.measured) <= {"fp32", "bf16", "int8"} and "fp32" in served.measured
    assert tags["kftune.serve.measured_on"] and tags["kftune.serve.agreement_fp32"] == "1.0000"
    answers = served.predict(["gainoku said", "the lossira dropmek"], 8)
    assert all(set(a) == {"entities"} for a in answers)
