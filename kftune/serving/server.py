"""The HTTP model server: KServe V1 and Open Inference Protocol V2 (REST) for one registered model.

Routes (NAME is the registered model's name):

- `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2/models/NAME/ready`, `GET /v1/models/NAME`: open
- `GET /v2/models/NAME` (metadata), `POST /v2/models/NAME/infer`, `POST /v1/models/NAME:predict`: need
  `Authorization: Bearer <token>` when tokens are configured
- `POST /v2/models/NAME/feedback`: the correct label of a logged prediction ({request_id, index, label,
  labeller} or {"feedback": [...]}), same auth as predictions; stored beside the request log
- `GET /metrics`: Prometheus

The server follows an alias: every `serve.poll_seconds` it asks the registry where the alias points;
a new version is loaded, measured and warmed beside the serving one, then swapped in with one
assignment. A request keeps the version it arrived on (see batching.py). Ready only once a version
is warm; not ready again once draining.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse

from kftune import __version__
from kftune.config import ConfigError, ServeConfig
from kftune.serving.batching import MicroBatcher, Overloaded
from kftune.serving.metrics import Metrics
from kftune.serving.model import ServedModel, ServingError, load_version
from kftune.serving.protocol import (HTTPError, check_texts, texts_from_v1, texts_from_v2, v1_response, v2_metadata,
                                     v2_response, valid_unicode)
from kftune.monitor.feedback import check_logged, write_feedback
from kftune.pii import mask as mask_pii
from kftune.serving.request_log import RequestLog, records

log = logging.getLogger(__name__)
access_log = logging.getLogger("kftune.serving.access")

TOKEN_ENV, TOKEN_FILE_ENV = "KFTUNE_SERVE_TOKEN", "KFTUNE_SERVE_TOKEN_FILE"
RETRY_POLLS = 10  # a version that failed to load is tried again after this many polls
REQUEST_ID = re.compile(r"[\w.:-]{1,64}", re.ASCII)  # ASCII: a header is read as latin-1


def request_ids():
    """Unique request ids: a random prefix per server start, then a counter (uuid4 per request reads the OS's
    random source each time: a system call on the event loop for every request)."""
    prefix = uuid.uuid4().hex[:16]
    return (f"{prefix}-{n:x}" for n in itertools.count(1)).__next__


def load_tokens(env: dict | None = None) -> list[str]:
    """Bearer tokens from KFTUNE_SERVE_TOKEN and/or KFTUNE_SERVE_TOKEN_FILE (one per line, # comments)."""
    env = os.environ if env is None else env
    tokens = [env[TOKEN_ENV].strip()] if env.get(TOKEN_ENV, "").strip() else []
    if env.get(TOKEN_FILE_ENV):
        path = Path(env[TOKEN_FILE_ENV])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"{TOKEN_FILE_ENV}={path}: cannot read the token file ({exc.strerror})") from None
        tokens += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not tokens:
            raise ConfigError(f"{TOKEN_FILE_ENV}={path}: the file has no tokens; refusing to serve without auth "
                              f"by accident (unset the variable to serve openly)")
    return tokens


def authorized(header: str | None, tokens: list[str]) -> bool:
    """Constant-time check of `Authorization: Bearer <token>` against every configured token."""
    if not tokens:
        return True
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    ok = False
    for token in tokens:  # no early exit: the time taken does not tell which token nearly matched
        ok |= hmac.compare_digest(given.strip().encode(), token.encode())
    return ok


@dataclass
class State:
    name: str
    alias: str | None
    cfg: ServeConfig
    tokens: list[str]
    pinned_version: str | None = None
    precision: str | None = None
    current: ServedModel | None = None
    draining: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    batcher: MicroBatcher | None = None
    request_log: RequestLog | None = None
    failed: dict = field(default_factory=dict)  # version -> when to try loading it again

    @property
    def ready(self) -> bool:
        return self.current is not None and not self.draining


async def in_own_thread(fn, *args):
    """fn(*args) in a new thread that ends with it.

    For loading a version: its warm-up runs torch's OpenMP parallel regions, and an OpenMP thread pool lives as long
    as the thread that started it. Kept alive in asyncio's executor, that second pool slowed the predict thread's
    forward passes by 20-30% on 2 cores (MiniLM micro-batches: 42 ms against 34 ms with the loading thread gone;
    likely libgomp spinning less once it manages more threads than there are CPUs).
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, exc):
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(result)

    def target():
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name="kftune-load", daemon=True).start()
    return await future


async def follow_alias(state: State) -> None:
    """Load the alias's version, then keep checking; swap in each new version once it is warm."""
    from kftune.registry import version_by_alias

    warned = False
    while True:
        try:
            want = state.pinned_version or await asyncio.to_thread(version_by_alias, state.name, state.alias)
            have = state.current.version if state.current else None
            retry_at = state.failed.get(want, 0)
            if want is None and have is None and not warned:
                warned = True
                log.warning("%s has no alias %r yet; not ready until it has", state.name, state.alias)
            elif want is not None and want != have and time.monotonic() >= retry_at and not state.draining:
                log.info("%s@%s -> v%s (serving %s): loading beside it", state.name, state.alias, want,
                         f"v{have}" if have else "nothing")
                started = time.perf_counter()
                try:
                    new = await in_own_thread(load_version, state.name, want, state.cfg, state.precision)
                except Exception as exc:  # noqa: BLE001 - keep serving the old version
                    state.failed[want] = time.monotonic() + RETRY_POLLS * state.cfg.poll_seconds
                    state.metrics.load_failures.inc()
                    log.error("could not load %s v%s, still serving %s: %s", state.name, want, have, exc)
                else:
                    old, state.current = state.current, new  # the swap: one reference assignment
                    state.metrics.serving(old, new)
                    state.metrics.load_seconds.set(time.perf_counter() - started)
                    if old is not None:
                        state.metrics.swaps.inc()
                    log.info("now serving %s v%s at %s (loaded and warm in %.1f s)", new.name, new.version,
                             new.precision, time.perf_counter() - started)
                    del old, new  # the old version goes once its requests are done, not at the next swap
        except Exception:  # noqa: BLE001 - registry unreachable for a while: keep serving, try again
            log.exception("checking %s@%s failed; trying again in %gs", state.name, state.alias, state.cfg.poll_seconds)
        if state.pinned_version and state.current:
            return
        await asyncio.sleep(state.cfg.poll_seconds)


class Observe:
    """ASGI middleware: a request id, Prometheus counts and latency, one access-log line per request, and a JSON
    500 for a bug (the server stays up). Plain ASGI: Starlette's BaseHTTPMiddleware costs a task and a stream
    per request, which under load was a fifth of the event loop's time."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics, self.next_id = app, metrics, request_ids()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        rid = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        st = scope.setdefault("state", {})
        st["request_id"] = rid if REQUEST_ID.fullmatch(rid) else self.next_id()
        st["n_texts"], st["version"] = 0, None
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", st["request_id"].encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - a bug answers 500 for this request, the server stays up
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if status is None:
                await JSONResponse({"error": "internal error (logged on the server)"}, 500)(scope, receive,
                                                                                          send_with_id)
            status = status or 500
        route = getattr(scope.get("route"), "path", "unmatched")
        seconds = time.perf_counter() - start
        self.metrics.request(route, status, seconds)
        if route != "/metrics" and not route.startswith("/v2/health"):
            client = scope.get("client")
            access_log.info(json.dumps({"request_id": st["request_id"], "method": scope["method"], "route": route,
                                        "status": status, "ms": round(seconds * 1000, 2), "texts": st["n_texts"],
                                        "version": st["version"], "client": client[0] if client else None}))


def create_app(state: State):
    """The ASGI app (Starlette); its lifespan starts the batcher, the request log and the alias follower."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import Response
    from starlette.routing import Route

    cfg, metrics = state.cfg, state.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.batcher = MicroBatcher(cfg.max_batch, cfg.max_wait_ms, metrics.batch.observe, cfg.max_queue)
        metrics.queue.set_function(lambda: state.batcher.waiting)
        metrics.ready.set_function(lambda: float(state.ready))  # so a signal handler only sets a flag
        state.batcher.start()
        if cfg.log_dir:
            state.request_log = RequestLog(cfg.log_dir, cfg.log_queue, cfg.log_flush_seconds, cfg.log_file_rows,
                                           mask=mask_pii if cfg.log_mask_pii else None, on_drop=metrics.log_dropped.inc)
            metrics.log_backlog.set_function(lambda: state.request_log.backlog)
        follower = asyncio.create_task(follow_alias(state), name="kftune-follow-alias")
        try:
            yield
        finally:
            state.draining = True
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await state.batcher.close()
            if state.request_log is not None:
                await asyncio.to_thread(state.request_log.close)
                log.info("request log flushed: %d predictions written, %d dropped", state.request_log.written,
                         state.request_log.dropped)

    def error(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def guard(request: Request, auth: bool = True) -> ServedModel:
        if auth and not authorized(request.headers.get("authorization"), state.tokens):
            raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            {"WWW-Authenticate": "Bearer"})
        name = request.path_params["name"]
        if name != state.name:
            raise HTTPError(404, f"unknown model {name[:100]!r}; this server serves {state.name!r}")
        served = state.current
        if served is None or state.draining:
            raise HTTPError(503, "draining" if state.draining else "no model version is warm yet; retry shortly")
        version = request.path_params.get("version")
        if version is not None and version != served.version:
            raise HTTPError(404, f"{name} version {version[:20]!r} is not served here; this server serves version "
                                 f"{served.version} (the /v2/models/{name}/... routes take whichever it serves)")
        return served

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise HTTPError(413, f"request body of {declared} bytes; the limit is serve.max_body_bytes="
                                 f"{cfg.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise HTTPError(413, f"request body over serve.max_body_bytes={cfg.max_body_bytes} bytes")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, an int of > 4300 digits
            raise HTTPError(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
        except RecursionError:
            raise HTTPError(400, "request body is JSON nested too deeply") from None

    async def predict(request: Request, served: ServedModel, texts: list[str]) -> list[dict]:
        request.state.n_texts, request.state.version = len(texts), served.version
        try:
            answers = await state.batcher.predict(served, texts)
        except Overloaded as exc:
            raise HTTPError(503, f"overloaded: {exc}; retry shortly", {"Retry-After": "1"}) from None
        counts = collections.Counter()  # one metrics call per label, not per text
        for a in answers:
            counts.update([a["label"]] if "label" in a else [span["type"] for span in a["entities"]])
        for label, n in counts.items():
            metrics.predictions.labels(label).inc(n)
        if state.request_log is not None:  # texts are masked by the log's writer thread (cfg.log_mask_pii)
            state.request_log.append(records(request.state.request_id, served, texts, answers, at=client_time(request)))
        return answers

    def client_time(request: Request) -> float | None:
        """The X-Kftune-Time header when serve.trust_client_time (replayed traffic), else None: the clock."""
        if not cfg.trust_client_time:
            return None
        try:
            at = float(request.headers.get("x-kftune-time", ""))
        except ValueError:
            return None
        return at if 0 < at < 1e11 else None

    async def feedback(request: Request):
        served = guard(request)
        if not cfg.log_dir:
            raise HTTPError(409, "feedback is stored beside the request log: this server has no serve.log_dir")
        if served.task != "sequence-classification":
            raise HTTPError(422, f"feedback takes a label per text; {served.name} is a {served.task} model")
        body = await read_json(request)
        items = body.get("feedback", [body]) if isinstance(body, dict) else None
        if not isinstance(items, list) or not items or len(items) > cfg.max_texts:
            raise HTTPError(422, f"expected {{request_id, label, index?, labeller?}} or {{\"feedback\": [...]}} with "
                                 f"1 to serve.max_texts={cfg.max_texts} items")
        rows = []
        for i, it in enumerate(items):
            where = f"feedback[{i}]" if "feedback" in body else "body"
            if not isinstance(it, dict):
                raise HTTPError(422, f"{where}: expected an object")
            rid, label, index = it.get("request_id"), it.get("label"), it.get("index", 0)
            if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid):
                raise HTTPError(422, f"{where}.request_id: expected the id a prediction answered with "
                                     f"(1-64 of letters, digits, _ . : -)")
            if label not in served.labels:
                raise HTTPError(422, f"{where}.label={str(label)[:50]!r}: not one of v{served.version}'s labels "
                                     f"{served.labels}")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < cfg.max_texts:
                raise HTTPError(422, f"{where}.index={str(index)[:20]!r}: expected the text's position in its request")
            labeller = it.get("labeller", "")
            if isinstance(labeller, str) and not valid_unicode(labeller):
                raise HTTPError(422, f"{where}.labeller: not valid Unicode (a lone surrogate)")
            rows.append({"request_id": rid, "index": index, "label": label, "source": "api",
                         "labeller": labeller[:100] if isinstance(labeller, str) else ""})
        recent = state.request_log.recent if state.request_log is not None else {}
        unknown = await asyncio.to_thread(check_logged, rows, recent, cfg.log_dir, served.name)
        if unknown:
            where = "feedback[{}]" if "feedback" in body else "body"
            raise HTTPError(422, "; ".join(f"{where.format(i)}: {why}" for i, why in unknown[:10]) +
                            f": feedback must name a prediction of {served.name} by the request id (and the text's "
                            f"index) its answer carried")
        await asyncio.to_thread(write_feedback, cfg.log_dir, rows)
        return JSONResponse({"accepted": len(rows), "model_name": served.name, "model_version": served.version})

    async def live(request: Request):
        return JSONResponse({"live": True})

    async def ready(request: Request):
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)

    async def model_ready(request: Request):
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != state.name:
            return error(404, f"unknown model {name[:100]!r}; this server serves {state.name!r}")
        ready = state.ready and (version is None or version == getattr(state.current, "version", None))
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    async def metadata(request: Request):
        return JSONResponse(v2_metadata(guard(request)))

    async def infer(request: Request):
        served = guard(request)
        body = await read_json(request)
        texts = check_texts(texts_from_v2(body), cfg)
        rid = body.get("id")
        if isinstance(rid, str) and not valid_unicode(rid):  # echoed as given: the answer could not be encoded
            raise HTTPError(422, "id: not valid Unicode (a lone surrogate)")
        if isinstance(rid, str) and REQUEST_ID.fullmatch(rid):  # also the header's and the log's key
            request.state.request_id = rid
        answers = await predict(request, served, texts)
        # V2 echoes the body's id as given; the X-Request-Id header and the log keep a safe one
        return JSONResponse(v2_response(served, answers, rid if isinstance(rid, str) and rid
                                        else request.state.request_id))

    async def server_metadata(request: Request):
        return JSONResponse({"name": "kftune", "version": __version__, "extensions": []})

    async def v1_predict(request: Request):
        served = guard(request)
        texts = check_texts(texts_from_v1(await read_json(request)), cfg)
        return JSONResponse(v1_response(served, await predict(request, served, texts)))

    async def prometheus(request: Request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def on_http_error(request, exc: HTTPError):
        return error(exc.status, exc.message, exc.headers)

    async def on_starlette(request, exc: HTTPException):  # no route (404), wrong method (405)
        return error(exc.status_code, str(exc.detail), exc.headers)

    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2/models/{name}/ready", model_ready), Route("/v1/models/{name}:predict", v1_predict,
                                                                  methods=["POST"]),
              Route("/v1/models/{name}", model_ready), Route("/v2/models/{name}", metadata),
              Route("/v2/models/{name}/infer", infer, methods=["POST"]), Route("/v2", server_metadata),
              Route("/v2/models/{name}/versions/{version}", metadata),
              Route("/v2/models/{name}/versions/{version}/ready", model_ready),
              Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
              Route("/v2/models/{name}/feedback", feedback, methods=["POST"]), Route("/metrics", prometheus)]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(Observe, metrics=metrics)],
                     exception_handlers={HTTPError: on_http_error, HTTPException: on_starlette})


def _require_model(name: str) -> None:
    """Fail before serving when the model name is wrong; a missing alias only delays readiness."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_registered_model(name)
    except MlflowException as exc:
        raise ServingError(f"no registered model {name!r} in {mlflow.get_tracking_uri()} ({exc.message[:200]}); "
                           f"`kftune models list --name NAME` shows what there is") from None


def run(name: str, alias: str | None, cfg: ServeConfig, host: str, port: int, version: str | None = None,
        precision: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish in-flight requests and flush the log."""
    import uvicorn

    from kftune.hardware import apply_threads

    _require_model(name)
    threads = apply_threads(cfg.threads)
    state = State(name, alias, cfg, load_tokens(), pinned_version=version, precision=precision)
    log.info("serving %s%s on http://%s:%d with %d torch threads (%s); auth %s", name,
             f"@{alias}" if not version else f" v{version}", host, port, threads.value, threads.reason,
             f"on ({len(state.tokens)} token(s))" if state.tokens else "off")

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # Install handlers explicitly: a process started from a background shell inherits SIGINT as
            # ignored, and uvicorn's own handler re-raises the signal after shutdown (exit status -15).
            def on_signal(sig, frame):
                log.info("%s: draining (no new connections; in-flight requests finish)", signal.Signals(sig).name)
                state.draining = True
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    # The logging HOWTO's "Optimization": records skip the caller's frame, thread and process lookups that the
    # format never prints (logging's share of the event loop's samples under load: 9% -> 4%).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    config = uvicorn.Config(create_app(state), host=host, port=port, access_log=False, log_config=None,
                            timeout_graceful_shutdown=cfg.drain_seconds, lifespan="on")
    Server(config).run()
    return 0
