"""Monitoring on a cluster: one `kftune monitor` check of the served model's request log (schedule it)."""

from kfp import dsl
from kfp.dsl import Dataset

from components import BASE_IMAGE
from components.monitor import monitor_op
from pipelines.tasks import use_secrets

NAME = "kftune-monitoring"


def create_pipeline(defaults: dict, image: str = BASE_IMAGE, cluster: bool = False):
    """Return the monitoring pipeline with `defaults` (a resolved params.yaml) as its default params."""

    @dsl.pipeline(name=NAME, description="Drift tests and alert rules on the served champion's live traffic.")
    def monitoring_pipeline(log_dir: str = defaults["serve"]["log_dir"], params: dict = defaults,
                            now: float = 0.0) -> Dataset:
        """kftune monitoring.

        1. monitor: read the request log since the watermark kept beside it, run the drift step's
           label-free tests on the champion's new traffic against its held-out reference, judge the
           alert rules of `monitor.rules`, send alerts that start or stop failing to the sinks, and
           log the check as a run of the `monitor.experiment` MLflow experiment with its report.
           `now` > 0 replaces the clock (replayed traffic).

        Returns the report folder.
        """
        task = monitor_op(log_dir=log_dir, params=params, now=now).set_display_name("1 monitor")
        task.set_caching_options(False)  # reads the live request log and the registry
        task.set_container_image(image)
        if cluster:
            from kfp import kubernetes

            from kftune.config import WEBHOOK_ENV

            use_secrets([task], defaults["cluster"])
            # the webhook sink's URL is a credential: from a Secret, optional (only the webhook sink needs it)
            kubernetes.use_secret_as_env(task, defaults["cluster"]["webhook_secret"], {WEBHOOK_ENV: WEBHOOK_ENV},
                                         optional=True)
        return task.outputs["report"]

    return monitoring_pipeline
