from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def tokenize_op(data: Input[Dataset], params: dict, tokenized: Output[Dataset]):
    """Tokenize every split with the base model's fast tokenizer (no padding stored)."""
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    from kftune.base_models import hub_offline

    hub_offline(params["model"]["name"])  # before anything imports transformers

    from kftune.config import params_from_dict
    from kftune.steps.tokenize import tokenize

    p = params_from_dict(params)
    stats = tokenize(data.path, tokenized.path, p.model.name, p.tokenize)
    tokenized.metadata.update({s: v["truncation_rate"] for s, v in stats["splits"].items()})
