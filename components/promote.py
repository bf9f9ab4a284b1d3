from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_op(params: dict, version: str, expected_champion: str, run_name: str) -> str:
    """Move `champion` to the gated version (old champion becomes previous-champion); returns the version.

    Refuses if the champion moved since the gate compared against it.
    """
    from kftune import registry
    from kftune.config import params_from_dict
    from kftune.tracking import configure

    configure()
    name = params_from_dict(params).register.model_name
    registry.promote(name, version, reason="passed the gate (see the version's kftune.reasons tag)",
                     who=f"pipeline:{run_name}", expected_champion=expected_champion)
    return version
