"""The training pipeline: ingest -> tokenize -> fine-tune -> evaluate -> register -> (gate) promote."""

from kfp import dsl
from kfp.dsl import Artifact

from components import BASE_IMAGE
from components.ingest import ingest_op
from kftune.run_inputs import defaults_of, docstring_args
from pipelines.tasks import for_cluster, run_settings, train_and_gate, use_image

NAME = "kftune-training"


def create_pipeline(defaults: dict, image: str = BASE_IMAGE, cluster: bool = False):
    """Return the pipeline function with `defaults` (a resolved params.yaml) as its default params.

    The settings a person changes per run (kftune.run_inputs) are typed inputs defaulting to their
    params.yaml values; every task runs in `image`; with cluster=True the tasks also get retries,
    resources and Secrets (see `for_cluster`).
    """
    run = defaults_of(defaults)

    def training_pipeline(data_path: str, data_repo: str = "", data_rev: str = "", data_hash: str = "",
                          base_model: str = run["base_model"], learning_rate: float = run["learning_rate"],
                          epochs: int = run["epochs"], batch_size: int = run["batch_size"],
                          min_delta: float = run["min_delta"], require_approval: bool = run["require_approval"],
                          params: dict = defaults, checkpoint_root: str = "", git_commit: str = "unknown") -> Artifact:
        settings = run_settings(params, base_model=base_model, learning_rate=learning_rate, epochs=epochs,
                                batch_size=batch_size, min_delta=min_delta, require_approval=require_approval)
        ingest = ingest_op(data_path=data_path, data_repo=data_repo, data_rev=data_rev, data_hash=data_hash,
                           params=settings.output).set_display_name("1 ingest")
        ingest.set_caching_options(False)  # the data behind a path can change between runs
        t = train_and_gate(ingest.outputs["data"], settings.output, checkpoint_root, git_commit, first=2)
        use_image([settings, ingest, *t.values()], image)
        if cluster:
            for_cluster([settings, ingest, *t.values()], [ingest, t["tokenize"], t["finetune"], t["evaluate"]],
                        t["finetune"], defaults["cluster"])
        return t["register"].outputs["gate"]

    training_pipeline.__doc__ = DOC.format(run_inputs=docstring_args())  # KFP reads Args: as input descriptions
    return dsl.pipeline(name=NAME, description="Fine-tune, evaluate, register and gate a text classifier.")(
        training_pipeline)


DOC = """kftune training.

0. settings: the params document with this run's inputs below applied, validated before any work.
1. ingest: read, clean and hash-split the labelled data at `data_path` (at `data_rev` of
   `data_repo` through DVC, when given; `data_hash` pins its content).
2. tokenize: fast tokenizer, truncation at max_length, no stored padding.
3. fine-tune: length-grouped, shuffled batches; early stopping; logs to MLflow.
4. evaluate: test metrics for the model and the majority / TF-IDF baselines.
5. register: a new registry version (alias challenger) and the gate's decision.
6. promote, only if the gate said so: champion moves, the old one becomes previous-champion.

Args:
    data_path: labelled data: a CSV/TSV/JSONL/Parquet file or folder, CoNLL, or s3://bucket/prefix.
    data_repo: git repo (path or URL) holding the DVC-tracked data; empty: this project.
    data_rev: git revision (tag, branch, commit) to read data_path at through DVC; empty: as it is.
    data_hash: expected content sha256 of the data (the run fails if it differs); empty: any.
{run_inputs}
    params: every other setting, the whole params.yaml document (the inputs above override their keys).
    checkpoint_root: folder for resumable fine-tune checkpoints; empty: none.
    git_commit: the code version, recorded on the MLflow run and the model version.

Returns:
    Output: the gate's record, decision.json with the version, the decision and its reasons.
"""
