from kfp import dsl
from kfp.dsl import Dataset, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def batch_predict_op(model: str, input_path: str, params: dict, predictions: Output[Dataset], text_column: str = "",
                     output_format: str = "parquet") -> str:
    """Predict every row of `input_path` (CSV/TSV/JSONL/Parquet, local or s3://) with a registered model
    (NAME for its champion, NAME@alias or NAME/VERSION); returns the version that predicted."""
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    from kftune.base_models import hub_offline

    hub_offline()  # before anything imports transformers

    from kftune.config import params_from_dict
    from kftune.serving.batch import predict_file
    from kftune.serving.model import load_version, parse_model_ref, resolve_version
    from kftune.tracking import configure

    p = params_from_dict(params)
    configure()
    name, alias, version = parse_model_ref(model)
    served = load_version(name, resolve_version(name, alias, version), p.serve)
    out = predict_file(served, input_path, predictions.path, text_column or p.ingest.text_column,
                       batch_size=p.serve.max_batch, output_format=output_format, progress=False)
    predictions.metadata.update({"model": name, "version": served.version, "precision": served.precision,
                                 "rows": out["rows"], "format": output_format})
    return served.version
