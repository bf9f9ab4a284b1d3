from kfp import dsl
from kfp.dsl import Artifact, Input

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def promote_op(params: dict, gate: Input[Artifact], run_name: str) -> str:
    """Move `champion` to the gated version (the old champion becomes previous-champion); returns it.

    Refuses if the champion moved since the gate compared against it.
    """
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    import json
    import os

    from kftune.config import params_from_dict
    from kftune.gate import promote
    from kftune.registry import RegistryError, actor
    from kftune.tracking import configure

    with open(os.path.join(gate.path, "decision.json"), encoding="utf-8") as f:
        decision = json.load(f)
    if decision["decision"] != "promote":
        raise RuntimeError(f"promote ran for a {decision['decision']!r} decision: {decision}")
    configure()
    register = params_from_dict(params).register
    try:
        promote(register.model_name, decision["version"], reason="passed the gate: " + " | ".join(decision["reasons"]),
                who=f"{actor()} via pipeline {run_name}", expected_champion=decision["champion_version"],
                keep_versions=register.keep_versions)
    except RegistryError as exc:  # the champion moved since the gate: the retraining run said "promote"
        if decision.get("retrain_run_id"):
            from mlflow import MlflowClient

            MlflowClient().set_tag(decision["retrain_run_id"], "kftune.decision", "refused")
            MlflowClient().set_tag(decision["retrain_run_id"], "kftune.refusal", str(exc)[:5000])
        raise
    return decision["version"]
