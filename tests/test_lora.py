"""finetune.method=lora: trains through peft, registers a small adapter version, loads back merged and predicts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from kftune.lora import ADAPTER, is_peft
from kftune.predict import predict_proba_with
from kftune.registry import load_components

from .conftest import subword_texts, train_and_register


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def test_lora_trains_registers_an_adapter_version_and_serves_it_merged(prepared, params, mlflow_store):
    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kftune.serving.model import load_version

    lora = dataclasses.replace(params, finetune=dataclasses.replace(params.finetune, method="lora", lora_learning_rate=1e-2))
    metrics, verdict = train_and_register(prepared, lora, "lora")
    assert metrics["model"]["macro_f1"] > 0.75, "the adapters and the head learn the sub-word stems"
    assert verdict.decision == "promote"
    out = prepared / "lora"
    summary = __import__("json").loads((out / "train_summary.json").read_text())
    assert summary["method"] == "lora" and (out / ADAPTER / "adapter_config.json").exists()

    uri = f"models:/{params.register.model_name}/{verdict.version}"
    artifacts = Path(mlflow.artifacts.download_artifacts(uri))
    assert not list(artifacts.rglob("model.safetensors")), "the version holds the adapter, not the weights"
    assert _size(artifacts / "peft") < (out / "model.safetensors").stat().st_size

    parts = load_components(uri)
    assert not is_peft(parts["model"]), "merged for predicting"
    texts = subword_texts(20, seed=11)["text"].tolist()
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    expected = predict_proba_with(merged, AutoTokenizer.from_pretrained(out), texts)
    np.testing.assert_allclose(predict_proba_with(parts["model"], parts["tokenizer"], texts), expected, atol=1e-5)
    served = load_version(params.register.model_name, verdict.version, params.serve, "fp32")
    assert [p["label"] for p in served.predict(texts, 8)] == [merged.config.id2label[i] for i in expected.argmax(1)]


def test_a_lora_version_whose_base_weights_changed_is_refused_at_load(prepared, params, mlflow_store, tmp_path):
    """MLflow records a LoRA version's base by path: an upgraded base package would load under the adapter."""
    import shutil

    import pytest
    import torch
    from transformers import AutoModelForMaskedLM

    from kftune.registry import RegistryError

    base = tmp_path / "base"
    shutil.copytree(params.model.name, base)
    lora = dataclasses.replace(params, model=dataclasses.replace(params.model, name=str(base)),
                               finetune=dataclasses.replace(params.finetune, method="lora", max_steps=20))
    _, verdict = train_and_register(prepared, lora, "lora")
    uri = f"models:/{params.register.model_name}/{verdict.version}"
    load_components(uri)  # the base as registered: loads
    upgraded = AutoModelForMaskedLM.from_pretrained(base)
    with torch.no_grad():
        upgraded.bert.encoder.layer[0].attention.self.query.weight.add_(0.01)
    upgraded.save_pretrained(base)  # the same path, other weights
    with pytest.raises(RegistryError, match=r"v\d+ is a LoRA adapter over the base model at .* whose weights changed"):
        load_components(uri)


def test_lora_on_a_model_type_peft_has_no_targets_for_says_so():
    import pytest
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from kftune.config import ConfigError
    from kftune.lora import wrap

    model = DistilBertForSequenceClassification(DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2,
                                                                 vocab_size=100))
    with pytest.raises(ConfigError, match="finetune.method=lora: peft has no default LoRA target modules for model "
                                          "type 'distilbert'"):
        wrap(model, 4, 8, 0.0, False)
