from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_op(data: Input[Dataset], model: Input[Model], params: dict, evaluation: Output[Dataset],
                metrics: Output[Metrics]):
    """Test metrics of the model and of the majority and TF-IDF baselines."""
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    from kftune.base_models import hub_offline

    hub_offline()  # before anything imports transformers

    from kftune.config import params_from_dict
    from kftune.hardware import bf16_for
    from kftune.steps.evaluate import evaluate

    p = params_from_dict(params)
    m = evaluate(data.path, model.path, evaluation.path, p.evaluate, bf16_for(p.finetune))
    key, baseline = m["primary"], m["baseline"]
    metrics.log_metric(f"test_{key}", m["model"][key])
    metrics.log_metric(f"baseline_{baseline}_{key}", m["baselines"][baseline][key])
