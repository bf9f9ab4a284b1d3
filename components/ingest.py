from kfp import dsl
from kfp.dsl import Dataset, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest_op(data_path: str, data_repo: str, data_rev: str, data_hash: str, params: dict,
              data: Output[Dataset]) -> str:
    """Read, clean and split the labelled data; returns the content SHA-256 of the cleaned dataset.

    With data_repo and/or data_rev, data_path is read through dvc.api at that revision. data_hash,
    when given, is the SHA-256 the submitter saw; it is part of the cache key (kfp hashes artifact
    URIs, not contents), and a mismatch fails the run instead of training on other data.
    """
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    import tempfile

    from kftune.config import params_from_dict
    from kftune.data import materialize
    from kftune.steps.ingest import ingest

    with tempfile.TemporaryDirectory() as tmp:
        local, lineage = materialize(data_path, data_repo, data_rev, tmp)
        p = params_from_dict(params)
        card = ingest(local, data.path, p.ingest, lineage, p.task)
    if data_hash and data_hash != card["sha256"]:
        raise ValueError(f"{data_path} at {data_rev or 'HEAD'} changed since submission: content SHA-256 "
                         f"{card['sha256']} != data_hash {data_hash}")
    if p.register.golden_test:  # read where register will read it, before the fine-tune, not after
        from kftune.splits import check_golden, read_golden

        golden = p.register.golden_test
        check_golden(read_golden(golden, p.ingest, p.task), card["labels"], golden)
    data.metadata.update({"sha256": card["sha256"], "rows": card["rows"], **card["lineage"]})
    return card["sha256"]
