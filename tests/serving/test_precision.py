"""The precision rule on made-up numbers, and the measurement on a real registered tiny model."""

import pytest

from kftune.config import load_params
from kftune.serving.model import int8_recipe, load_version, recorded_precisions, split_texts, version_reference
from kftune.serving.precision import Int8Recipe, choose_precision, convert, measure_precisions
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
    tie = choose_precision("auto", {"fp32": m(1.0, 100), "int8": m(1.0, 105)}, 0.995, min_speedup=1.1)
    assert tie.value == "fp32" and "less than 1.1x fp32: int8" in tie.reason, "within the noise, fp32 is kept"
    assert choose_precision("auto", {"fp32": m(1.0, 100), "int8": m(1.0, 111)}, 0.995, 1.1).value == "int8"
    assert choose_precision("int8", {}, 0.995).value == "int8"


def test_measure_on_the_versions_own_held_out_rows(serve_store, monkeypatch):
    import mlflow
    import torch

    use_mlflow_store(serve_store, monkeypatch)
    texts, calibration, _ = version_reference(CLASSIFIER, "1", 30, 20)
    assert len(texts) == 30 and len(calibration) == 20 and not set(texts) & set(calibration)
    parts = mlflow.transformers.load_model(f"models:/{CLASSIFIER}/1", return_type="components")
    cfg = load_params(ROOT / "params.yaml").serve
    recipe = int8_recipe(cfg, parts["tokenizer"], calibration)
    out = measure_precisions(parts["model"], parts["tokenizer"], texts, precisions=["fp32", "int8"], batch_size=8,
                             int8=recipe)
    assert out["fp32"]["agreement"] == 1 and 0 <= out["int8"]["agreement"] <= 1
    assert all(v["texts_per_s"] > 0 for v in out.values())
    assert 0 <= out["int8"]["fp32_share"] <= 1 and "fp32_share" not in out["fp32"]
    assert out["fp32"]["batching"] == "packed", "timed as served: a BERT classifier's fp32 micro-batches are packed"
    quantised = convert(parts["model"], "int8")
    assert any(isinstance(x, torch.ao.nn.quantized.dynamic.Linear) for x in quantised.modules())
    assert type(convert(parts["model"], "int8", recipe)).__name__ == "FallbackToFp32"
    assert convert(parts["model"], "bf16").dtype == torch.bfloat16 and parts["model"].dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        convert(parts["model"], "fp8")


def test_agreement_is_the_share_of_texts_whose_answer_the_other_precision_changes(serve_store, monkeypatch):
    """A stand-in for a lossy precision whose damage is known: the classifier's bias moved so that about half the
    texts change label. The measured agreement must be that share, computed here on plain padded batches."""
    import copy

    import mlflow
    import torch

    from kftune.serving import precision

    use_mlflow_store(serve_store, monkeypatch)
    texts, _, _ = version_reference(CLASSIFIER, "1", 40, 0)
    parts = mlflow.transformers.load_model(f"models:/{CLASSIFIER}/1", return_type="components")
    model, tok = parts["model"].eval(), parts["tokenizer"]
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
    margin = (logits[:, 0] - logits[:, 1]).sort().values
    shift = float(margin[len(texts) // 2 - 1] + margin[len(texts) // 2]) / 2  # between two texts: no ties
    lossy = copy.deepcopy(model)
    with torch.no_grad():
        lossy.classifier.bias[1] += shift
    expected = float(((logits + torch.tensor([0.0, shift])).argmax(1) == logits.argmax(1)).float().mean())
    assert 0 < expected < 1
    monkeypatch.setattr(precision, "convert", lambda m, p, int8=None: lossy if p == "int8" else m)
    out = measure_precisions(model, tok, texts, precisions=["fp32", "int8"], batch_size=8)
    assert out["fp32"]["agreement"] == 1 and out["int8"]["agreement"] == pytest.approx(expected)
    choice = choose_precision("auto", out, 0.995)
    assert choice.value == "fp32" and "below the agreement bar: int8" in choice.reason


def test_load_version_records_the_choice_on_the_version(serve_store, monkeypatch):
    from mlflow import MlflowClient

    use_mlflow_store(serve_store, monkeypatch)
    cfg = load_params(ROOT / "params.yaml", ["serve.agreement_rows=20", "serve.max_batch=8"]).serve
    served = load_version(TAGGER, "1", cfg)
    tags = MlflowClient().get_model_version(TAGGER, "1").tags
    assert tags["kftune.serve.precision"] == served.precision and served.task == "token-classification"
    assert set(served.measured) <= {"fp32", "bf16", "int8"} and "fp32" in served.measured
    assert tags["kftune.serve.measured_on"] and float(tags["kftune.serve.agreement_fp32"]) == 1.0
    answers = served.predict(["gainoku said", "the lossira dropmek"], 8)
    assert all(set(a) == {"entities"} for a in answers)


def test_registration_measures_on_the_test_split_and_says_so_on_the_version(serve_store, monkeypatch):
    from mlflow import MlflowClient

    from kftune.serving.model import DESCRIPTION_PREFIX, machine, measure_at_registration
    from kftune.steps.resolve import reference_rows

    use_mlflow_store(serve_store, monkeypatch)
    client = MlflowClient()
    held = client.get_model_version(CLASSIFIER, "1").tags  # the gate held it (promoted by hand for these tests)
    assert held["kftune.held_by"] and held.get("kftune.serve.measured_when") != "at registration", \
        "a held version is not measured at registration (the server measures it if it is promoted by hand)"

    # what the register step calls for a version the gate passes, on the version's own test split
    cfg = load_params(ROOT / "params.yaml", ["serve.agreement_rows=40", "serve.max_batch=8"]).serve
    rows = reference_rows(serve_store / "clf" / "data")
    with _retagged(CLASSIFIER, "2", {}):
        choice = measure_at_registration(CLASSIFIER, "2", serve_store / "clf" / "model", rows, "sequence-classification",
                                         cfg)
        mv = client.get_model_version(CLASSIFIER, "2")
    measured, where = recorded_precisions(mv.tags)
    assert where == machine() and mv.tags["kftune.serve.measured_when"] == "at registration"
    assert measured["fp32"]["agreement"] == 1 and all(m["texts_per_s"] > 0 for m in measured.values())
    assert measured["fp32"]["batching"] == "packed" and f"fp32 {measured['fp32']['texts_per_s']:g} texts/s packed" \
        in mv.tags["kftune.serve.precision_reason"], "the version says how each precision was batched"
    assert mv.tags["kftune.serve.precision"] == choice.value == choose_precision("auto", measured, 0.995, 1.1).value
    said = mv.description.split("\n\n")[-1]  # after the model card
    assert mv.description.startswith(f"# {CLASSIFIER} v2"), "the model card is kept"
    assert said.startswith(f"{DESCRIPTION_PREFIX} {choice.value} on {machine()}")
    assert "fastest with agreement >= 0.995" in said and "measured at registration" in said


def _retagged(name: str, version: str, changes: dict):
    """Apply tag changes to a version of the shared store; undo them when the block ends."""
    import contextlib

    from mlflow import MlflowClient

    @contextlib.contextmanager
    def block():
        client = MlflowClient()
        before = client.get_model_version(name, version)
        for k, v in changes.items():
            client.set_model_version_tag(name, version, k, v)
        try:
            yield
        finally:
            for k in set(client.get_model_version(name, version).tags) - set(before.tags):
                client.delete_model_version_tag(name, version, k)
            for k, v in before.tags.items():
                client.set_model_version_tag(name, version, k, v)
            client.update_model_version(name, version, description=before.description or "")
    return block()


def _recorded(int8_agreement: str, where: str | None = None) -> dict:
    """Tags as record_precisions writes them: fp32 and bf16 slower than an int8 of the given agreement."""
    from kftune.serving.model import int8_settings, machine

    settings = int8_settings(load_params(ROOT / "params.yaml").serve)
    return {"kftune.serve.measured_on": where or machine(), "kftune.serve.int8_settings": settings,
            "kftune.serve.agreement_fp32": "1.0000",
            "kftune.serve.texts_per_s_fp32": "100", "kftune.serve.agreement_bf16": "1.0000",
            "kftune.serve.texts_per_s_bf16": "120", "kftune.serve.agreement_int8": int8_agreement,
            "kftune.serve.texts_per_s_int8": "1e6"}


def test_auto_at_load_serves_what_was_recorded_on_this_machine_without_measuring(serve_store, monkeypatch):
    from kftune.serving import model as served_model

    use_mlflow_store(serve_store, monkeypatch)
    cfg = load_params(ROOT / "params.yaml", ["serve.max_batch=8"]).serve
    measured_again = []
    monkeypatch.setattr(served_model.prec, "measure_precisions",
                        lambda *a, **k: measured_again.append(1) or {"fp32": m(1.0, 100)})
    # recorded: int8 agrees fully and is far faster, so auto must pick it from the tags alone
    with _retagged(CLASSIFIER, "2", _recorded("1.0000")):
        served = load_version(CLASSIFIER, "2", cfg)
    assert not measured_again and served.precision == "int8"
    assert "as measured earlier on this machine" in served.precision_reason
    with _retagged(CLASSIFIER, "2", _recorded("0.9000")):
        assert load_version(CLASSIFIER, "2", cfg).precision != "int8"  # serve.min_agreement applies at load
    assert not measured_again
    other = load_params(ROOT / "params.yaml", ["serve.max_batch=8", "serve.int8_fallback_margin=0"]).serve
    with _retagged(CLASSIFIER, "2", _recorded("1.0000")):
        load_version(CLASSIFIER, "2", other)
    assert measured_again, "numbers measured with other serve.int8_* settings are measured again"


def test_auto_at_load_measures_when_the_numbers_come_from_another_machine(serve_store, monkeypatch):
    from mlflow import MlflowClient

    from kftune.serving.model import machine

    use_mlflow_store(serve_store, monkeypatch)
    cfg = load_params(ROOT / "params.yaml", ["serve.agreement_rows=20", "serve.max_batch=8"]).serve
    with _retagged(CLASSIFIER, "2", _recorded("1.0000", where="another CPU, 64 cores")):
        served = load_version(CLASSIFIER, "2", cfg)
        tags = MlflowClient().get_model_version(CLASSIFIER, "2").tags
    assert "as measured earlier" not in served.precision_reason and served.measured["fp32"]["agreement"] == 1
    assert tags["kftune.serve.measured_on"] == machine() and tags["kftune.serve.measured_when"] == "at load"
    # the copy that was measured is the one served (not built a second time): it answers as measured
    assert [a["label"] in ("negative", "positive") for a in served.predict(["gainoku said", "the lossira"], 8)] == [
        True, True]


def test_a_recorded_agreement_reads_back_whole_not_rounded_past_the_minimum(serve_store, monkeypatch):
    """2 of 397 texts disagreeing is 0.99496: under serve.min_agreement 0.995. Tagged with four decimals it read
    back as 0.9950, and a restarted server served the precision its first start had refused."""
    from mlflow import MlflowClient

    from kftune.serving.model import record_precisions

    use_mlflow_store(serve_store, monkeypatch)
    with _retagged(CLASSIFIER, "2", {}):
        record_precisions(CLASSIFIER, "2", "fp32", "test", {"fp32": m(1.0, 100.0), "int8": m(395 / 397, 500.0)})
        measured, _ = recorded_precisions(MlflowClient().get_model_version(CLASSIFIER, "2").tags)
    assert measured["int8"]["agreement"] == 395 / 397 < 0.995
