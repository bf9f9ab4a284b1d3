"""The training pipeline: ingest -> tokenize -> fine-tune -> evaluate -> register -> (gate) promote."""

from kfp import dsl
from kfp.dsl import Artifact

from components.evaluate import evaluate_op
from components.finetune import finetune_op
from components.ingest import ingest_op
from components.promote import promote_op
from components.register import register_op
from components.tokenize import tokenize_op

NAME = "kftune-training"


def for_cluster(tasks: list, retryable: list, finetune, cluster: dict) -> None:
    """Cluster-only task settings: retries, the fine-tune task's resources, credentials from Secrets.

    Only idempotent tasks retry (a retried register would register a second version). Credentials
    never travel as pipeline parameters: every task reads them from Kubernetes Secrets as
    environment variables. kfp.local ignores all of this.
    """
    from kfp import kubernetes

    for task in retryable:
        task.set_retry(num_retries=cluster["retries"], backoff_duration="30s", backoff_factor=2)
    finetune.set_cpu_request(cluster["finetune_cpu"]).set_cpu_limit(cluster["finetune_cpu"])
    finetune.set_memory_request(cluster["finetune_memory"]).set_memory_limit(cluster["finetune_memory"])
    if cluster["finetune_gpus"]:
        finetune.set_accelerator_type(cluster["accelerator_type"]).set_accelerator_limit(cluster["finetune_gpus"])
    for task in tasks:
        kubernetes.use_secret_as_env(task, cluster["mlflow_secret"], {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
        kubernetes.use_secret_as_env(task, cluster["s3_secret"], {
            k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")})


def train_and_gate(data, params, checkpoint_root, git_commit, first: int, init_model=None) -> dict:
    """Tasks tokenize -> fine-tune -> evaluate -> register -> (gate) promote on an ingest-format dataset.

    Shared by the training and retraining pipelines; `first` numbers the display names. Returns
    the tasks by name.
    """
    tokenize = tokenize_op(data=data, params=params).set_display_name(f"{first} tokenize")
    extra = {"init_model": init_model} if init_model is not None else {}
    finetune = finetune_op(tokenized=tokenize.outputs["tokenized"], params=params, checkpoint_root=checkpoint_root,
                           run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, **extra)
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


def create_pipeline(defaults: dict, cluster: bool = False):
    """Return the pipeline function with `defaults` (a resolved params.yaml) as its default params.

    With cluster=True the tasks also get retries, resources and Secrets (see `for_cluster`).
    """

    @dsl.pipeline(name=NAME, description="Fine-tune, evaluate, register and gate a text classifier.")
    def training_pipeline(data_path: str, data_repo: str = "", data_rev: str = "", data_hash: str = "",
                          params: dict = defaults, checkpoint_root: str = "", git_commit: str = "unknown") -> Artifact:
        """kftune training.

        1. ingest: read, clean and hash-split the labelled data at `data_path` (at `data_rev` of
           `data_repo` through DVC, when given; `data_hash` pins its content).
        2. tokenize: fast tokenizer, truncation at max_length, no stored padding.
        3. fine-tune: length-grouped, shuffled batches; early stopping; logs to MLflow.
        4. evaluate: test metrics for the model and the majority / TF-IDF baselines.
        5. register: a new registry version (alias challenger) and the gate's decision.
        6. promote, only if the gate said so: champion moves, the old one becomes previous-champion.

        Returns the gate's record: decision.json with the version, the decision and its reasons.
        """
        ingest = ingest_op(data_path=data_path, data_repo=data_repo, data_rev=data_rev, data_hash=data_hash,
                           params=params).set_display_name("1 ingest")
        ingest.set_caching_options(False)  # the data behind a path can change between runs
        t = train_and_gate(ingest.outputs["data"], params, checkpoint_root, git_commit, first=2)
        if cluster:
            for_cluster([ingest, *t.values()], [ingest, t["tokenize"], t["finetune"], t["evaluate"]], t["finetune"],
                        defaults["cluster"])
        return t["register"].outputs["gate"]

    return training_pipeline
