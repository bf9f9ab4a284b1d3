from kfp import dsl
from kfp.dsl import Dataset, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def resolve_op(data_path: str, data_repo: str, data_rev: str, params: dict, run_name: str, data: Output[Dataset],
               champion: Output[Model], task_id: str = "") -> str:
    """Read the latest data version, compare it with the champion's rows, write the challenger's dataset.

    Returns first-training, nothing-new or new-data. Opens the MLflow run that records this
    retraining decision; its id travels in the dataset card (lineage.retrain_run_id). task_id: this task's
    KFP id, so a retried attempt closes the run an evicted one left RUNNING.
    """
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    from kftune.base_models import hub_offline

    hub_offline()  # before anything imports transformers

    import tempfile

    from kftune.config import params_from_dict
    from kftune.data import materialize
    from kftune.steps.resolve import resolve, start_retraining_run

    p = params_from_dict(params)
    run_id = start_retraining_run(p, run_name, task_id)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local, lineage = materialize(data_path, data_repo, data_rev, tmp)
            card = resolve(local, data.path, champion.path, p, lineage, run_id)
    except Exception as exc:  # the run records why; a retry of this task opens its own
        from kftune.tracking import fail_run

        fail_run(run_id, f"resolve: {type(exc).__name__}: {exc}")
        raise
    data.metadata.update({"status": card["status"], "new_rows": card["new_rows"], "retrain_run_id": run_id})
    return card["status"]
