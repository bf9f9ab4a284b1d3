"""The training pipeline: ingest -> tokenize -> fine-tune -> evaluate -> register -> (gate) promote."""

from kfp import dsl
from kfp.dsl import Artifact

from components import BASE_IMAGE
from components.ingest import ingest_op
from pipelines.tasks import for_cluster, train_and_gate, use_image

NAME = "kftune-training"


def create_pipeline(defaults: dict, image: str = BASE_IMAGE, cluster: bool = False):
    """Return the pipeline function with `defaults` (a resolved params.yaml) as its default params.

    Every task runs in `image`; with cluster=True the tasks also get retries, resources and Secrets
    (see `for_cluster`).
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
        use_image([ingest, *t.values()], image)
        if cluster:
            for_cluster([ingest, *t.values()], [ingest, t["tokenize"], t["finetune"], t["evaluate"]], t["finetune"],
                        defaults["cluster"])
        return t["register"].outputs["gate"]

    return training_pipeline
