"""What the training and retraining pipelines share: the train-and-gate subgraph and cluster settings."""

from kfp import dsl

from components.evaluate import evaluate_op
from components.finetune import finetune_op
from components.promote import promote_op
from components.register import register_op
from components.settings import settings_op
from components.tokenize import tokenize_op


def use_image(tasks: list, image: str) -> None:
    """Run every task in `image` (the component image built from infra/Dockerfile)."""
    for task in tasks:
        task.set_container_image(image)


def for_cluster(tasks: list, retryable: list, finetune, cluster: dict) -> None:
    """Cluster-only task settings: retries, the fine-tune task's resources, credentials from Secrets.

    Only idempotent tasks retry (a retried register would register a second version). Credentials
    never travel as pipeline parameters: every task reads them from Kubernetes Secrets as
    environment variables. kfp.local ignores all of this.
    """
    for task in retryable:
        task.set_retry(num_retries=cluster["retries"], backoff_duration="30s", backoff_factor=2)
    finetune.set_cpu_request(cluster["finetune_cpu"]).set_cpu_limit(cluster["finetune_cpu"])
    finetune.set_memory_request(cluster["finetune_memory"]).set_memory_limit(cluster["finetune_memory"])
    if cluster["finetune_gpus"]:
        finetune.set_accelerator_type(cluster["accelerator_type"]).set_accelerator_limit(cluster["finetune_gpus"])
    if cluster["finetune_gpus"] > 1:  # NCCL's shared-memory transport outgrows a pod's 64 MiB /dev/shm
        from kfp import kubernetes

        kubernetes.empty_dir_mount(finetune, "dshm", "/dev/shm", medium="Memory")
    use_secrets(tasks, cluster)


SECRET_KEYS = (  # (cluster.* Secret, keys every task needs, keys passed on when the Secret has them)
    ("mlflow_secret", ("MLFLOW_TRACKING_URI",),
     ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")),
    ("s3_secret", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
     ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")),
)


def use_secrets(tasks: list, cluster: dict) -> None:
    """Credentials as environment variables from the Kubernetes Secrets named in `cluster`, never parameters."""
    from kfp import kubernetes

    for task in tasks:
        for secret, required, optional in SECRET_KEYS:
            kubernetes.use_secret_as_env(task, cluster[secret], {k: k for k in required})
            # keys only some setups have (a login to MLflow; MinIO's endpoints, which plain AWS S3 does without):
            # set when the Secret holds them, and no pod fails to start when it does not
            kubernetes.use_secret_as_env(task, cluster[secret], {k: k for k in optional}, optional=True)


def run_settings(params, **run_inputs):
    """Task 0: the params document with this run's typed inputs (kftune.run_inputs) applied; its output is
    every later task's `params`."""
    return settings_op(params=params, **run_inputs).set_display_name("0 settings")


def train_and_gate(data, params, checkpoint_root, git_commit, first: int, init_model=None) -> dict:
    """Tasks tokenize -> fine-tune -> evaluate -> register -> (gate) promote on an ingest-format dataset.

    `first` numbers the display names. Returns the tasks by name.
    """
    tokenize = tokenize_op(data=data, params=params).set_display_name(f"{first} tokenize")
    extra = {"init_model": init_model} if init_model is not None else {}
    finetune = finetune_op(tokenized=tokenize.outputs["tokenized"], params=params, checkpoint_root=checkpoint_root,
                           run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER,
                           **extra)
    finetune.set_display_name(f"{first + 1} fine-tune").set_caching_options(False)  # each run logs its own MLflow run
    evaluate = evaluate_op(data=data, model=finetune.outputs["model"], params=params)
    evaluate.set_display_name(f"{first + 2} evaluate")
    register = register_op(data=data, model=finetune.outputs["model"], evaluation=evaluate.outputs["evaluation"],
                           params=params, run_id=finetune.outputs["Output"], git_commit=git_commit)
    register.set_display_name(f"{first + 3} register + gate").set_caching_options(False)  # reads the registry
    with dsl.If(register.outputs["Output"] == "promote", name="gate-passed"):
        promote = promote_op(params=params, gate=register.outputs["gate"], run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        promote.set_display_name(f"{first + 4} promote to champion").set_caching_options(False)
    return {"tokenize": tokenize, "finetune": finetune, "evaluate": evaluate, "register": register, "promote": promote}
