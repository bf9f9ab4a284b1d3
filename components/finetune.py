from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune_op(tokenized: Input[Dataset], params: dict, data_sha256: str, checkpoint_root: str,
                run_name: str, model: Output[Model]) -> str:
    """Fine-tune the base model, logging to a new MLflow run; returns that run's id.

    Checkpoints go to checkpoint_root/<data hash>-<params hash>, so re-running the same data and
    settings after a crash resumes instead of starting over. Empty checkpoint_root disables that.
    With cluster.finetune_gpus > 1 the training runs under torchrun, one process per GPU.
    """
    import os

    import mlflow

    from kftune.config import params_from_dict
    from kftune.runner import torchrun_finetune
    from kftune.steps.finetune import finetune
    from kftune.tracking import start_run

    p = params_from_dict(params)
    ckpt = os.path.join(checkpoint_root, f"{data_sha256[:16]}-{p.digest()}") if checkpoint_root else None
    run_id = start_run(p, run_name)
    if p.cluster.finetune_gpus > 1:
        torchrun_finetune(tokenized.path, model.path, p, p.cluster.finetune_gpus, run_id, ckpt)
        model.metadata.update({"mlflow_run_id": run_id, "processes": p.cluster.finetune_gpus})
        return run_id
    with mlflow.start_run(run_id=run_id):
        summary = finetune(tokenized.path, model.path, p.model.name, p.finetune, checkpoint_dir=ckpt,
                           on_log=lambda metrics, step: mlflow.log_metrics(metrics, step=step))
        mlflow.log_metrics({"best_val_macro_f1": summary["best_val_macro_f1"],
                            "train_examples_per_second": summary["examples_per_second"]})
    model.metadata.update({"best_val_macro_f1": summary["best_val_macro_f1"], "mlflow_run_id": run_id})
    return run_id
