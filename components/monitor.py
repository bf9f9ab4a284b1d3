from kfp import dsl
from kfp.dsl import Dataset, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def monitor_op(log_dir: str, params: dict, now: float, report: Output[Dataset]) -> int:
    """One monitoring check of the request log (drift tests, alert rules, MLflow run); returns the alert events."""
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    import os

    from kftune.config import params_from_dict
    from kftune.monitor.check import monitor_once

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    c = monitor_once(log_dir, params_from_dict(params), now if now > 0 else None,
                     cache_dir=os.path.join(report.path, ".cache"), out_dir=report.path)
    report.metadata.update({"run_id": c["run_id"], "drift": str(c["drifted"]),
                            "events": ", ".join(f"{e['alert']} {e['status']}" for e in c["events"])})
    return len(c["events"])
