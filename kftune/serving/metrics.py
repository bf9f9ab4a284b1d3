"""Prometheus series of the server: counters end in _total, durations are histograms in seconds, and
labels take few values (a route template, a status code, a class label; never a text or a request id)."""

from __future__ import annotations

import contextlib

from kftune.serving.model import ServedModel


class Metrics:
    """Prometheus series of one server (own registry, so tests can run several apps in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("kftune_serve_requests", "HTTP requests by route and status code",
                                ["route", "code"], registry=r)
        self.errors = Counter("kftune_serve_request_errors", "HTTP requests answered with a 4xx or 5xx code",
                              ["route", "code"], registry=r)
        self.latency = Histogram("kftune_serve_request_duration_seconds", "Request latency", ["route"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("kftune_serve_batch_texts", "Texts per micro-batch sent to the model", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue = Gauge("kftune_serve_queue_texts", "Texts waiting for or in a forward pass (load shedding past "
                           "serve.max_queue)", registry=r)
        self.predictions = Counter("kftune_serve_predictions", "Predicted labels (token classification: entities "
                                   "by type)", ["label"], registry=r)
        self.model = Gauge("kftune_serve_model_info", "1 for the version and precision being served", 
                           ["model", "version", "precision"], registry=r)
        self.ready = Gauge("kftune_serve_ready", "1 when a warm version is serving and the server is not draining",
                           registry=r)  # read from the server's state at each scrape (kftune.serving.server)
        self.swaps = Counter("kftune_serve_model_swaps", "Versions swapped in after the alias moved", registry=r)
        self.load_seconds = Gauge("kftune_serve_model_load_seconds", "Seconds the serving version took to load, "
                                  "choose its precision and warm up, before it took traffic", registry=r)
        self.load_failures = Counter("kftune_serve_model_load_failures", "Versions that failed to load", registry=r)
        self.log_dropped = Counter("kftune_serve_request_log_dropped", "Predictions not written to the request log "
                                   "(its queue full, or still unwritten when the server stopped)", registry=r)
        self.log_backlog = Gauge("kftune_serve_request_log_backlog", "Predictions waiting to be written to the request "
                                 "log (growing: its writes fail and are being tried again)", registry=r)
        self._by_route: dict = {}  # (route, code) -> its series: a labels() lookup per request costs the event loop

    def request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        series = self._by_route.get((route, status))
        if series is None:
            code = str(status)
            series = self._by_route[route, status] = (
                self.requests.labels(route, code), self.errors.labels(route, code) if status >= 400 else None,
                self.latency.labels(route))
        series[0].inc()
        if series[1] is not None:
            series[1].inc()
        series[2].observe(seconds)

    def serving(self, old: ServedModel | None, new: ServedModel) -> None:
        if old is not None:
            with contextlib.suppress(KeyError):
                self.model.remove(old.name, old.version, old.precision)
        self.model.labels(new.name, new.version, new.precision).set(1)
