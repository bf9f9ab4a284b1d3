from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest_op(data_path: str, params: dict, data: Output[Dataset]) -> str:
    """Read, clean and split the labelled data; returns the content SHA-256 of the cleaned dataset."""
    from kftune.config import params_from_dict
    from kftune.steps.ingest import ingest

    card = ingest(data_path, data.path, params_from_dict(params).ingest)
    data.metadata.update({"sha256": card["sha256"], "rows": card["rows"], "labels": card["labels"]})
    return card["sha256"]
