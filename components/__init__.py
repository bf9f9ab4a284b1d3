"""KFP v2 components: thin @dsl.component wrappers around the pure steps in kftune.steps.

Each body imports inside itself (KFP ships only the function source to the container) and maps
Input/Output artifact paths onto the same arguments the CLI passes.
"""

import os

# The one component image (infra/Dockerfile); set KFTUNE_IMAGE at compile time to your registry's tag.
IMAGE = os.environ.get("KFTUNE_IMAGE", "kftune:0.1.0")
