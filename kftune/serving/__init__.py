"""Serving the registry's champion: `kftune serve` (KServe V1 and Open Inference Protocol V2 over HTTP) and
`kftune predict` (batch prediction of a file).

- model.py: a registered version loaded, at a chosen precision, warmed up, predicting raw texts
- precision.py: fp32 / bf16 / int8, their agreement with fp32 and speed, and the choice between them
- batching.py: concurrent requests gathered into length-sorted, per-batch padded forward passes
- request_log.py: every prediction appended to rotating Parquet files, off the request path
- server.py: the HTTP app (protocols, limits, auth, metrics, hot swap) and its graceful process
- batch.py: a file in, a file of predictions out, in bounded memory
- cli.py: the `serve` and `predict` subcommands
"""
