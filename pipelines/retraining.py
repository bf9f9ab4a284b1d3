"""The retraining pipeline: resolve -> (something new) drift -> (retrain) train and gate a challenger."""

from kfp import dsl
from kfp.dsl import Dataset

from components import BASE_IMAGE
from components.drift import drift_op
from components.resolve import resolve_op
from kftune.data import DATASET
from kftune.run_inputs import defaults_of, docstring_args
from pipelines.tasks import for_cluster, run_settings, train_and_gate, use_image

NAME = "kftune-retraining"


def create_pipeline(defaults: dict, image: str = BASE_IMAGE, cluster: bool = False):
    """Return the retraining pipeline with `defaults` (a resolved params.yaml) as its default params and
    run inputs (kftune.run_inputs), every task in `image`."""
    run = defaults_of(defaults)

    def retraining_pipeline(data_path: str = DATASET, data_repo: str = "", data_rev: str = "",
                            base_model: str = run["base_model"], learning_rate: float = run["learning_rate"],
                            epochs: int = run["epochs"], batch_size: int = run["batch_size"],
                            min_delta: float = run["min_delta"], require_approval: bool = run["require_approval"],
                            params: dict = defaults, force: bool = False, checkpoint_root: str = "",
                            git_commit: str = "unknown") -> Dataset:
        settings = run_settings(params, base_model=base_model, learning_rate=learning_rate, epochs=epochs,
                                batch_size=batch_size, min_delta=min_delta, require_approval=require_approval)
        p = settings.output
        resolve = resolve_op(data_path=data_path, data_repo=data_repo, data_rev=data_rev, params=p,
                             run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                             task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER).set_display_name("1 resolve data")
        resolve.set_caching_options(False)  # reads the latest data and the registry
        tasks = [settings, resolve]
        with dsl.If(resolve.outputs["Output"] != "nothing-new", name="something-new"):
            drift = drift_op(data=resolve.outputs["data"], champion=resolve.outputs["champion"], params=p,
                             force=force).set_display_name("2 drift")
            drift.set_caching_options(False)  # the cooldown reads the registry's history
            with dsl.If(drift.outputs["Output"] == "retrain", name="retrain"):
                t = train_and_gate(resolve.outputs["data"], p, checkpoint_root, git_commit, first=3,
                                   init_model=resolve.outputs["champion"])
        tasks += [drift, *t.values()]
        use_image(tasks, image)
        if cluster:
            for_cluster(tasks, [resolve, drift, t["tokenize"], t["finetune"], t["evaluate"]], t["finetune"],
                        defaults["cluster"])
        return resolve.outputs["data"]

    retraining_pipeline.__doc__ = DOC.format(run_inputs=docstring_args())  # Args: become input descriptions
    return dsl.pipeline(name=NAME, description="Detect drift and retrain, compare and promote a challenger.")(
        retraining_pipeline)


DOC = """kftune retraining.

0. settings: the params document with this run's inputs below applied, validated before any work.
1. resolve: the latest data version (`data_rev` of `data_repo` through DVC; empty means the
   newest) against the rows the champion was trained on: new rows, history, and the
   challenger's training set (new rows + a replay sample of history). No champion: a first
   training on everything.
2. drift, unless nothing is new: embedding MMD, predicted labels, confidence, vocabulary and
   label tests against the champion's held-out rows; decides retrain (drift, enough new rows,
   or `force`; never within the cooldown after a promotion unless forced) or skip.
3-6. tokenize, fine-tune (warm-started from the champion), evaluate on the new test split and
   the frozen historical one, register + gate (new-data macro-F1 >= champion + min_delta,
   historical drop <= max_forgetting, beats the TF-IDF baseline, smoke test).
7. promote, only if the gate passed.

Args:
    data_path: the versioned dataset folder (DVC-tracked) to read the latest data from.
    data_repo: git repo (path or URL) holding it; empty: this project.
    data_rev: git revision to read it at; empty: the newest commit.
{run_inputs}
    params: every other setting, the whole params.yaml document (the inputs above override their keys).
    force: train a challenger even without drift, enough new rows, or during the cooldown.
    checkpoint_root: folder for resumable fine-tune checkpoints; empty: none.
    git_commit: the code version, recorded on the MLflow runs and the model version.

Returns:
    Output: resolve's dataset; its data_card.json names the MLflow run holding every decision.
"""
