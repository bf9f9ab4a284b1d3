"""`python -m kftune.serving serve|predict ...`: the serving commands alone (a container's entry point
starts faster without the training CLI's imports)."""

import argparse
import logging
import sys

from kftune.config import ConfigError
from kftune.serving.cli import add_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kftune.serving")
    parser.add_argument("--project-dir", default=".", help="where mlflow.db lives (sqlite default store)")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
