from kfp import dsl

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def settings_op(params: dict, base_model: str, learning_rate: float, epochs: int, batch_size: int,
                min_delta: float, require_approval: bool) -> dict:
    """This run's settings: the params document with the run's typed inputs applied and validated, before
    any step does work. Every later task reads this output, so the params digest covers what actually ran."""
    from kftune.taskexit import skip_teardown

    skip_teardown()  # the process ends once the outputs are written (kftune/taskexit.py)

    from kftune.run_inputs import apply

    return apply(params, {"base_model": base_model, "learning_rate": learning_rate, "epochs": epochs,
                          "batch_size": batch_size, "min_delta": min_delta, "require_approval": require_approval})
