"""`python -m kftune`: the CLI through a given interpreter (dvc.yaml uses the project's .venv)."""

import sys

from kftune.cli import main

sys.exit(main())
