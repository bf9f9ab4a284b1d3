"""The pipeline's per-run settings as typed KFP inputs: in the compiled IR with types, defaults and
descriptions, and applied by the settings task without changing the params digest."""

import pytest
import yaml

from components.settings import settings_op
from kftune.cluster import compile_pipeline
from kftune.config import ConfigError, params_from_dict
from kftune.run_inputs import RUN_INPUTS, defaults_of

TYPES = {"base_model": "STRING", "learning_rate": "NUMBER_DOUBLE", "epochs": "NUMBER_INTEGER",
         "batch_size": "NUMBER_INTEGER", "min_delta": "NUMBER_DOUBLE", "require_approval": "BOOLEAN"}


@pytest.mark.parametrize("which", ["training", "retraining"])
def test_compiled_ir_has_typed_run_inputs_with_defaults_and_descriptions(tmp_path, params, which):
    spec = next(yaml.safe_load_all(compile_pipeline(params, tmp_path / "p.yaml", which).read_text()))
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    for name, key in RUN_INPUTS.items():
        assert inputs[name]["parameterType"] == TYPES[name], name
        assert inputs[name]["defaultValue"] == defaults_of(params.to_dict())[name], "the default is params.yaml's"
        assert f"(params.yaml {key})" in inputs[name]["description"]
    assert inputs["epochs"]["defaultValue"] == params.finetune.epochs
    assert inputs["data_path"]["description"] and inputs["params"]["description"], "every input is described"
    tasks = spec["root"]["dag"]["tasks"]
    first = "ingest-op" if which == "training" else "resolve-op"
    assert tasks[first]["inputs"]["parameters"]["params"]["taskOutputParameter"]["producerTask"] == "settings-op"


def _floats(value):  # what a trip through KFP's Struct does to every integer
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def test_the_settings_task_keeps_the_digest_and_applies_what_a_run_changes(params):
    doc = params.to_dict()
    same = settings_op.python_func(params=_floats(doc), **_floats(defaults_of(doc)))
    assert params_from_dict(same).digest() == params.digest(), "a run with the defaults is the same settings"
    changed = params_from_dict(settings_op.python_func(params=doc, **{**defaults_of(doc), "epochs": 1.0,
                                                                      "require_approval": True}))
    assert changed.finetune.epochs == 1 and changed.register.require_approval
    assert changed.digest() != params.digest()
    with pytest.raises(ConfigError, match="finetune.batch_size"):
        settings_op.python_func(params=doc, **{**defaults_of(doc), "batch_size": 0})
    lora = {**doc, "finetune": {**doc["finetune"], "method": "lora"}}  # its rate is finetune.lora_learning_rate
    assert params_from_dict(settings_op.python_func(params=lora, **defaults_of(lora))).finetune.method == "lora"
    with pytest.raises(ConfigError, match="learning_rate=5e-05 sets finetune.learning_rate, which finetune.method=lora "
                                          "does not use: set finetune.lora_learning_rate"):
        settings_op.python_func(params=lora, **{**defaults_of(lora), "learning_rate": 5e-5})
