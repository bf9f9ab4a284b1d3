"""Batch prediction on a cluster: a registered model predicts a file of texts."""

from kfp import dsl
from kfp.dsl import Dataset

from components import BASE_IMAGE
from components.batch_predict import batch_predict_op
from pipelines.tasks import use_secrets

NAME = "kftune-batch-predict"


def create_pipeline(defaults: dict, image: str = BASE_IMAGE, cluster: bool = False):
    """Return the batch-prediction pipeline with `defaults` (a resolved params.yaml) as its default params.

    With cluster=True the task reads the MLflow URI and the S3 keys from the Secrets named in
    `cluster.mlflow_secret` and `cluster.s3_secret`, as the training tasks do.
    """

    @dsl.pipeline(name=NAME, description="Predict a file of texts with a registered model version.")
    def batch_predict_pipeline(input_path: str, model: str = f"{defaults['register']['model_name']}@champion",
                               params: dict = defaults, text_column: str = "", output_format: str = "parquet") -> Dataset:
        """kftune batch prediction.

        1. predict: load `model` (NAME, NAME@alias or NAME/VERSION) from the registry at its serving
           precision, read `input_path` in chunks, predict each chunk in length-sorted batches and
           write the predictions in input order (label, probability, every class's probability and
           the version; entity spans for token classification).

        Returns the predictions file.
        """
        task = batch_predict_op(model=model, input_path=input_path, params=params, text_column=text_column,
                                output_format=output_format).set_display_name("1 batch predict")
        task.set_caching_options(False)  # the alias moves and the input may change under the same path
        task.set_container_image(image)
        if cluster:
            use_secrets([task], defaults["cluster"])
        return task.outputs["predictions"]

    return batch_predict_pipeline
