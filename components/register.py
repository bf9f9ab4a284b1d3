from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_op(data: Input[Dataset], model: Input[Model], evaluation: Input[Dataset], params: dict,
                run_id: str, git_commit: str) -> NamedTuple("Gate", decision=str, version=str, champion_version=str):
    """Register a model version (alias challenger) and run the gate against the current champion."""
    import tempfile
    from collections import namedtuple

    from kftune.config import params_from_dict
    from kftune.steps.register import register

    d = register(data.path, model.path, evaluation.path, tempfile.mkdtemp(), params_from_dict(params), run_id,
                 git_commit)
    return namedtuple("Gate", "decision version champion_version")(d.decision, d.version, d.champion_version)
