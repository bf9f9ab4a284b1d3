"""KFP v2 components: thin @dsl.component wrappers around the pure steps in kftune.steps.

Each body imports inside itself (KFP ships only the function source to the container) and maps
Input/Output artifact paths onto the same arguments the CLI passes. The image every task runs in
is set when a pipeline is built (pipelines.tasks.use_image), not here.
"""

BASE_IMAGE = "kftune:0.1.0"  # what `make image` builds; the pipeline factories override it per task
