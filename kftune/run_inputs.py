"""The few settings a person changes per pipeline run, as typed KFP pipeline inputs.

Each is one params.yaml key; its default is that key's value when the pipeline is built, and its
description is the key's meaning (`kftune params`), so the KFP UI's run form shows names, types,
defaults and descriptions. Every other setting stays in the `params` document.
"""

from __future__ import annotations

import copy

RUN_INPUTS = {  # pipeline input: params.yaml key
    "base_model": "model.name",
    "learning_rate": "finetune.learning_rate",
    "epochs": "finetune.epochs",
    "batch_size": "finetune.batch_size",
    "min_delta": "register.min_delta",
    "require_approval": "register.require_approval",
}


def defaults_of(params: dict) -> dict:
    """The run inputs' defaults: their keys' values in a resolved params document."""
    return {name: params[key.split(".")[0]][key.split(".")[1]] for name, key in RUN_INPUTS.items()}


def apply(params: dict, inputs: dict) -> dict:
    """`params` with the run inputs written into their keys, validated (raises ConfigError naming each key)."""
    from kftune.config import ConfigError, params_from_dict

    lora = params["finetune"]["method"] == "lora"
    if lora and "learning_rate" in inputs and float(inputs["learning_rate"]) != params["finetune"]["learning_rate"]:
        raise ConfigError(f"pipeline inputs: learning_rate={inputs['learning_rate']!r} sets finetune.learning_rate, "
                          f"which finetune.method=lora does not use: set finetune.lora_learning_rate in the params "
                          f"(now {params['finetune']['lora_learning_rate']!r})")
    data = copy.deepcopy(params)
    for name, value in inputs.items():
        section, key = RUN_INPUTS[name].split(".")
        data[section][key] = value
    return params_from_dict(data, source="pipeline inputs").to_dict()


def docstring_args() -> str:
    """The `Args:` lines KFP turns into input descriptions, for the run inputs."""
    from kftune.config import params_help

    meanings = params_help()
    return "\n".join(f"    {name}: {meanings[key]} (params.yaml {key})" for name, key in RUN_INPUTS.items())
