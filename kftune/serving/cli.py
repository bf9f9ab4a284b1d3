"""`kftune serve` and `kftune predict`: thin adapters from argv to kftune.serving."""

from __future__ import annotations

import argparse
import os

from kftune.config import SERVE_PRECISIONS, load_params


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. -S serve.max_batch=16 (repeatable)")
    p.add_argument("--precision", choices=SERVE_PRECISIONS, help="override serve.precision")


def cmd_serve(args) -> int:
    from kftune.serving.model import parse_model_ref
    from kftune.serving.server import run
    from kftune.tracking import configure

    cfg = load_params(args.params, args.set or []).serve
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure(args.project_dir)
    name, alias, version = parse_model_ref(args.model, args.alias)
    return run(name, alias, cfg, args.host, args.port, version=version, precision=args.precision)


def cmd_predict(args) -> int:
    from kftune.hardware import apply_threads
    from kftune.serving.batch import file_format, predict_file, require_input
    from kftune.serving.model import load_version, parse_model_ref, resolve_version
    from kftune.tracking import configure

    params = load_params(args.params, args.set or [])
    file_format(args.input), file_format(args.output)  # before the model loads
    require_input(args.input)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure(args.project_dir)
    name, alias, version = parse_model_ref(args.model)
    version = resolve_version(name, alias, version)
    threads = int(apply_threads(params.serve.threads).value)  # the server's rule, so predict and serve run alike
    served = load_version(name, version, params.serve, args.precision)
    print(f"{name} v{version}: {served.task}, {served.precision} ({served.precision_reason}); {threads} torch threads")
    print(f"batching: {served.batching.reason}")
    out = predict_file(served, args.input, args.output, args.text_column or params.ingest.text_column,
                       args.chunk_rows, params.serve.max_batch, progress=not args.no_progress)
    print(f"wrote {out['rows']} predictions to {out['output']} in {out['seconds']} s ({out['texts_per_s']} texts/s)")
    return 0


def add_commands(sub) -> None:
    """Register `serve` and `predict` on the kftune command's subparsers."""
    p = sub.add_parser("serve", help="serve a registered model over HTTP (KServe V1 + Open Inference Protocol V2), "
                                     "following an alias")
    p.add_argument("--model", required=True, help="registered model name (NAME/VERSION pins one version)")
    p.add_argument("--alias", default="champion", help="alias to follow (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8080, help="default: %(default)s")
    _params_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", help="predict a file of texts with a registered model (batch)")
    p.add_argument("--model", required=True, help="NAME (its champion), NAME@alias or NAME/VERSION")
    p.add_argument("--input", required=True, help="CSV/TSV/JSONL/Parquet file, local or s3://")
    p.add_argument("--output", required=True, help="FILE.csv, .tsv, .jsonl or .parquet (local or s3://)")
    p.add_argument("--text-column", help="column with the texts (default: ingest.text_column)")
    p.add_argument("--chunk-rows", type=int, default=10000, help="rows held in memory at once (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _params_args(p)
    p.set_defaults(func=cmd_predict)
