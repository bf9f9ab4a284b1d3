"""kftune: continuous fine-tuning of transformer text classifiers on Kubeflow Pipelines and MLflow."""

__version__ = "0.1.0"
