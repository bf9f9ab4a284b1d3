from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def drift_op(data: Input[Dataset], champion: Input[Model], params: dict, force: bool, report: Output[Dataset]) -> str:
    """Drift tests of the new rows against the champion's held-out rows; returns retrain or skip."""
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    from kftune.base_models import hub_offline

    hub_offline()  # before anything imports transformers

    import json
    import os

    from kftune.config import params_from_dict
    from kftune.steps.drift import drift

    with open(os.path.join(data.path, "data_card.json"), encoding="utf-8") as f:
        run_id = json.load(f)["lineage"].get("retrain_run_id", "")
    r = drift(data.path, champion.path, report.path, params_from_dict(params), force=force, run_id=run_id)
    report.metadata.update({"decision": r["decision"], "drift": str(r["drift"]), "flags": ",".join(r["flags"])})
    return r["decision"]
