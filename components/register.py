from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register_op(data: Input[Dataset], model: Input[Model], evaluation: Input[Dataset], params: dict,
                run_id: str, git_commit: str, gate: Output[Artifact]) -> str:
    """Register a model version (alias challenger) and run the gate against the current champion.

    Returns the decision (promote | hold | awaiting-approval) as the task's single `Output`: kfp.local
    (2.17) cannot resolve a named NamedTuple output inside a dsl.If condition and silently skips the
    branch. The version and the champion compared against travel in the `gate` artifact.
    """
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    from kftune.base_models import hub_offline

    hub_offline()  # before anything imports transformers

    from kftune.config import params_from_dict
    from kftune.steps.register import register

    import os

    # the image's commit (set when it was built) is the code that ran; the parameter is the submitter's checkout
    commit = os.environ.get("KFTUNE_GIT_COMMIT") or git_commit
    d = register(data.path, model.path, evaluation.path, gate.path, params_from_dict(params), run_id, commit)
    gate.metadata.update({"decision": d.decision, "version": d.version, "champion_version": d.champion_version})
    return d.decision
