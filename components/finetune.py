from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def finetune_op(tokenized: Input[Dataset], params: dict, checkpoint_root: str,
                run_name: str, model: Output[Model], init_model: Input[Model] = None, task_id: str = "") -> str:
    """Fine-tune the base model, logging to a new MLflow run; returns that run's id.

    init_model (retraining): the champion exported by the resolve step; training starts from its
    weights when its kftune.json says so (see kftune.steps.resolve.warm_start), at retrain.learning_rate,
    else from the base at finetune.learning_rate.

    Checkpoints go to checkpoint_root/<tokenized data hash>-<params hash>, so re-running the same data and
    settings after a crash resumes instead of starting over. Empty checkpoint_root disables that.
    With cluster.finetune_gpus > 1 the training runs under torchrun, one process per GPU. task_id: this task's
    KFP id, so a retried attempt closes the run an evicted one left RUNNING.
    """
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    from kftune.base_models import hub_offline

    hub_offline(params["model"]["name"])  # before anything imports transformers

    import dataclasses
    import os

    import mlflow

    from kftune.config import params_from_dict
    from kftune.fileio import read_json
    from kftune.steps.finetune import finetune, launch, tokenized_digest
    from kftune.tracking import start_run

    p = params_from_dict(params)
    start, cfg = p.model.name, p.finetune
    if init_model is not None and os.path.exists(os.path.join(init_model.path, "kftune.json")):
        if read_json(os.path.join(init_model.path, "kftune.json"))["warm_start"]:
            # the champion's weights are tuned already: a fresh run's learning rate would move them too far
            warm = p.retrain.warm_learning_rate
            start, cfg = init_model.path, dataclasses.replace(
                p.finetune, learning_rate=warm(p.finetune.learning_rate),
                lora_learning_rate=warm(p.finetune.lora_learning_rate))
    ckpt = os.path.join(checkpoint_root, f"{tokenized_digest(tokenized.path)[:16]}-{p.digest()}") if checkpoint_root else None
    run_id = start_run(p, run_name, task_id)
    with mlflow.start_run(run_id=run_id):
        if p.cluster.finetune_gpus > 1:  # one process per GPU under torchrun; rank 0 logs the steps and
            # writes the model with its train_summary.json, which the run's records below come from
            launch(tokenized.path, model.path, start, cfg, p.cluster.finetune_gpus, run_id, ckpt)
            summary = read_json(os.path.join(model.path, "train_summary.json"))
            model.metadata["processes"] = p.cluster.finetune_gpus
        else:
            summary = finetune(tokenized.path, model.path, start, cfg, checkpoint_dir=ckpt,
                               on_log=lambda metrics, step: mlflow.log_metrics(metrics, step=step))
        best = {k: v for k, v in summary.items() if k.startswith("best_val_")}
        mlflow.log_metrics({**best, "train_examples_per_second": summary["examples_per_second"]})
        mlflow.set_tags({**{f"kftune.{k}": summary[k] for k in ("precision", "precision_reason", "threads",
                                                                "threads_reason", "seed")},
                         "kftune.collapsed_runs": len(summary["collapsed_runs"])})
    model.metadata.update({**best, "mlflow_run_id": run_id})
    return run_id
