"""`kftune serve` as a real process on loopback: both protocols, both tasks, limits, auth, metrics, hot swap,
rollback, SIGTERM drain and the request log."""

import json
from pathlib import Path
import signal
import threading
import time

import pytest
import requests
from mlflow import MlflowClient

from kftune import registry
from kftune.serving.request_log import read_request_log
from tests.serving.conftest import CLASSIFIER, TAGGER, Server

TOKEN = "s3cret-token-for-tests"
LIMITS = ["serve.precision=fp32", "serve.max_texts=4", "serve.max_text_chars=60", "serve.max_body_bytes=2000"]


@pytest.fixture(scope="module")
def guarded(serve_store, tmp_path_factory):
    """The classifier with auth on (one token from the env, two from a file) and small limits."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text("# one per line\nother-token\n\nthird-token\n")
    server = Server(serve_store, CLASSIFIER, LIMITS,
                    env={"KFTUNE_SERVE_TOKEN": TOKEN, "KFTUNE_SERVE_TOKEN_FILE": str(tokens)})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def v2_body(texts, **extra):
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}], **extra}


def test_both_protocols_answer_label_probabilities_and_version(guarded):
    texts = ["the gainoku rose today", "board said lossira"]
    v1 = requests.post(f"{guarded.url}/v1/models/{CLASSIFIER}:predict", json={"instances": texts}, headers=auth())
    assert v1.status_code == 200, v1.text
    preds = v1.json()["predictions"]
    assert len(preds) == 2 and v1.json()["model_version"] == "1"
    for p in preds:
        assert p["model_version"] == "1" and set(p["probabilities"]) == {"negative", "positive"}
        assert p["probability"] == max(p["probabilities"].values()) == p["probabilities"][p["label"]]
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)

    v2 = requests.post(f"{guarded.url}/v2/models/{CLASSIFIER}/infer", json=v2_body(texts, id="req-1"),
                       headers=auth("third-token"))
    assert v2.status_code == 200, v2.text
    body = v2.json()
    assert body["model_name"] == CLASSIFIER and body["model_version"] == "1" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"]["data"] == [p["label"] for p in preds]
    assert out["probabilities"]["shape"] == [2, 2] and out["probability"]["datatype"] == "FP32"
    labels = body["parameters"]["labels"]
    flat = [preds[i]["probabilities"][lbl] for i in range(2) for lbl in labels]
    assert out["probabilities"]["data"] == pytest.approx(flat, abs=1e-6), "the same answer through both protocols"

    meta = requests.get(f"{guarded.url}/v2/models/{CLASSIFIER}", headers=auth()).json()
    assert meta["versions"] == ["1"] and meta["inputs"][0]["datatype"] == "BYTES"
    assert meta["parameters"]["precision"] == "fp32" and meta["parameters"]["labels"] == labels
    assert meta["parameters"]["batching"].startswith("packed rows"), "a BERT at fp32 packs its micro-batches"
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{CLASSIFIER}/ready", f"/v1/models/{CLASSIFIER}"):
        assert requests.get(guarded.url + path).status_code == 200, f"{path} is open and ready"

    # the versioned V2 routes answer for the served version only; the body's id comes back as sent
    odd = "line\nbreak " + "x" * 100
    r = requests.post(f"{guarded.url}/v2/models/{CLASSIFIER}/versions/1/infer", json=v2_body(texts, id=odd),
                      headers=auth())
    assert r.status_code == 200 and r.json()["id"] == odd and r.headers["x-request-id"] != odd
    assert requests.post(f"{guarded.url}/v2/models/{CLASSIFIER}/versions/9/infer", json=v2_body(texts),
                         headers=auth()).status_code == 404
    assert requests.get(f"{guarded.url}/v2/models/{CLASSIFIER}/versions/1", headers=auth()).json()["versions"] == ["1"]
    assert requests.get(f"{guarded.url}/v2/models/{CLASSIFIER}/versions/1/ready").status_code == 200
    assert requests.get(f"{guarded.url}/v2/models/{CLASSIFIER}/versions/9/ready").status_code == 503
    assert requests.get(f"{guarded.url}/v2").json()["name"] == "kftune"


@pytest.mark.parametrize("headers", [{}, auth("wrong"), {"Authorization": TOKEN}, {"Authorization": "Basic x"}])
def test_prediction_endpoints_need_a_valid_bearer_token(guarded, headers):
    for method, path, body in [("post", f"/v1/models/{CLASSIFIER}:predict", {"instances": ["a"]}),
                               ("post", f"/v2/models/{CLASSIFIER}/infer", v2_body(["a"])),
                               ("get", f"/v2/models/{CLASSIFIER}", None)]:
        r = requests.request(method, guarded.url + path, json=body, headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"], path
        assert r.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in guarded.log() and "other-token" not in guarded.log(), "tokens are never logged"


@pytest.mark.parametrize("body, code, names", [
    ({"instances": ["a"] * 5}, 413, "serve.max_texts=4"),
    ({"instances": ["a" * 61]}, 422, "serve.max_text_chars=60"),
    ({"instances": ["a " * 1200]}, 413, "serve.max_body_bytes=2000"),
    ({"instances": [3]}, 422, "text 0 is a int"),
    ({"instances": "not a list"}, 422, "must be a list"),
    ({"instances": []}, 422, "no texts"),
    ({"texts": ["a"]}, 422, "instances"),
    ([1, 2], 422, "instances"),
])
def test_limits_and_bad_requests_name_the_problem(guarded, body, code, names):
    r = requests.post(f"{guarded.url}/v1/models/{CLASSIFIER}:predict", json=body, headers=auth())
    assert r.status_code == code and names in r.json()["error"], r.text


def test_malformed_input_never_causes_a_500(guarded):
    url = f"{guarded.url}/v2/models/{CLASSIFIER}/infer"
    cases = [
        (b"{not json", 400), (b"\xff\xfe", 400), (b"", 400), (b"null", 422), (b'"text"', 422),
        (b"[" * 1000 + b"]" * 1000, 400),  # nested past the recursion limit, within the body limit
        (json.dumps({"inputs": [{"name": "text", "datatype": "FP32", "data": [1.0]}]}).encode(), 422),
        (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]}).encode(), 422),
        (json.dumps({"inputs": []}).encode(), 422),
        (json.dumps(v2_body(["", " ", "\u0000\u200b", "😀 émoji ünïcode", "[CLS] [SEP] [PAD]"])).encode(), 413),
        (json.dumps(v2_body(["", " ", "\u0000\u200b", "😀 émoji [SEP] [PAD]"])).encode(), 200),
        (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [["a"], ["b"]]}]}).encode(), 200),
        (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 3], "data": ["a", "b"]}]}).encode(),
         422),
        (json.dumps(v2_body(["a \ud800 b"])).encode(), 422),  # a lone surrogate: valid JSON, not valid text
        (json.dumps(v2_body(["a"], id="\ud800")).encode(), 422),  # the id is echoed: it must be encodable too
    ]
    for raw, code in cases:
        r = requests.post(url, data=raw, headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == code, (raw, r.text)
        assert "error" in r.json() if code >= 400 else len(r.json()["outputs"][0]["data"]) >= 2
    assert requests.post(f"{guarded.url}/v1/models/nope:predict", json={"instances": ["a"]},
                         headers=auth()).status_code == 404
    assert requests.get(f"{guarded.url}/v2/models/nope/ready").status_code == 404
    assert requests.get(f"{guarded.url}/no/such/route").status_code == 404
    assert requests.get(f"{guarded.url}/v2/health/live").status_code == 200, "still alive"
    # a header is read as latin-1: a non-ASCII id would come back re-encoded, so the server gives its own
    r = requests.post(url, json=v2_body(["a"]), headers={**auth(), "X-Request-Id": "id\u00fc"})
    assert r.ok and r.headers["x-request-id"].isascii() and r.json()["id"] == r.headers["x-request-id"]


def test_metrics_count_requests_errors_batches_and_predictions(guarded):
    for _ in range(3):
        requests.post(f"{guarded.url}/v1/models/{CLASSIFIER}:predict", json={"instances": ["gainoku", "x"]},
                      headers=auth())
    requests.post(f"{guarded.url}/v1/models/{CLASSIFIER}:predict", json={"instances": ["x"]})  # 401
    text = requests.get(f"{guarded.url}/metrics").text
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    route = 'route="/v1/models/{name}:predict"'
    assert series[f'kftune_serve_requests_total{{code="200",{route}}}'] >= 3
    assert series[f'kftune_serve_request_errors_total{{code="401",{route}}}'] >= 1
    assert series[f'kftune_serve_request_duration_seconds_count{{{route}}}'] >= 4
    assert series["kftune_serve_batch_texts_count"] >= 3 and series["kftune_serve_batch_texts_sum"] >= 6
    predicted = sum(v for k, v in series.items() if k.startswith("kftune_serve_predictions_total"))
    assert predicted >= 6
    assert series[f'kftune_serve_model_info{{model="{CLASSIFIER}",precision="fp32",version="1"}}'] == 1
    assert series["kftune_serve_ready"] == 1 and "kftune_serve_request_log_dropped_total" in series
    access = [json.loads(line.split("kftune.serving.access: ", 1)[1]) for line in guarded.log().splitlines()
              if "kftune.serving.access: " in line]
    assert access and all(set(a) == {"request_id", "method", "route", "status", "ms", "texts", "version", "client"}
                          for a in access)
    assert "gainoku" not in "".join(line for line in guarded.log().splitlines() if "access" in line), \
        "no request text in the access log"


def test_token_classification_spans_with_character_offsets_and_sigint_stops_cleanly(start_server):
    server = start_server(TAGGER, ["serve.precision=fp32"], sigint_ignored=True)
    texts = ["the board said gainoku and lossira dropmek today", ""]
    v1 = requests.post(f"{server.url}/v1/models/{TAGGER}:predict", json={"instances": texts})
    assert v1.status_code == 200, v1.text
    preds = v1.json()["predictions"]
    assert preds[1]["entities"] == [] and all(p["model_version"] == "1" for p in preds)
    assert preds[0]["entities"], "the tagger finds something in the first text: the span checks below run"
    for span in preds[0]["entities"]:
        assert texts[0][span["start"]:span["end"]] == span["text"] and span["type"] in ("per", "org")
        assert 0 <= span["score"] <= 1
    v2 = requests.post(f"{server.url}/v2/models/{TAGGER}/infer", json=v2_body(texts)).json()
    assert [json.loads(d) for d in v2["outputs"][0]["data"]] == [p["entities"] for p in preds]
    assert requests.get(f"{server.url}/v2/models/{TAGGER}").json()["parameters"]["task"] == "token-classification"
    assert server.stop(signal.SIGINT) == 0, "SIGINT handled although the process started with it ignored"
    logged = read_request_log(str(server.log_dir))
    assert logged["text"].tolist() == texts * 2 and logged["label"].isna().all()
    assert [json.loads(e) for e in logged["entities"][:2]] == [p["entities"] for p in preds]


def test_past_max_queue_a_request_gets_a_503_with_retry_after_and_the_queued_one_is_answered(start_server):
    # the first request waits max_wait_ms for company; a second arriving meanwhile would exceed max_queue=1
    server = start_server(CLASSIFIER, ["serve.precision=fp32", "serve.max_queue=1", "serve.max_wait_ms=4000"])
    url = f"{server.url}/v1/models/{CLASSIFIER}:predict"
    first: list = []
    waiting = threading.Thread(target=lambda: first.append(requests.post(url, json={"instances": ["gainoku"]})))
    waiting.start()
    _until(lambda: "kftune_serve_queue_texts 1.0" in requests.get(f"{server.url}/metrics").text, 10, "one queued text")
    refused = requests.post(url, json={"instances": ["lossira"]})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "serve.max_queue=1" in refused.json()["error"]
    waiting.join(30)
    assert first[0].status_code == 200 and first[0].json()["predictions"][0]["model_version"] == "1"
    assert requests.post(url, json={"instances": ["again"]}).status_code == 200, "served again once the queue emptied"
    assert 'kftune_serve_request_errors_total{code="503",route="/v1/models/{name}:predict"} 1.0' in \
        requests.get(f"{server.url}/metrics").text


def _hammer(url: str, stop: threading.Event, results: list, n_threads: int = 4, prefix: str = "c"):
    def client(i):
        session = requests.Session()
        k = 0
        while not stop.is_set():
            rid = f"{prefix}{i}-{k}"
            try:
                r = session.post(url, json={"instances": ["gainoku said", "the lossira"]},
                                 headers={"X-Request-ID": rid}, timeout=30)
                results.append((rid, r.status_code, r.json().get("model_version")))
            except requests.RequestException as exc:
                results.append((rid, type(exc).__name__, None))
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    return threads


def _until(predicate, timeout=60, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_hot_swap_and_rollback_under_load_then_sigterm_drains_and_logs_everything(start_server, serve_store):
    server = start_server(CLASSIFIER, ["serve.precision=auto", "serve.agreement_rows=40"])
    url = f"{server.url}/v1/models/{CLASSIFIER}:predict"
    stop, results = threading.Event(), []
    threads = _hammer(url, stop, results)
    try:
        _until(lambda: len(results) > 10, what="first answers")
        registry.promote(CLASSIFIER, "2", "serving test: hot swap")
        _until(lambda: any(v == "2" for _, _, v in results[-5:]), what="answers from v2")
        registry.rollback(CLASSIFIER, "serving test: rollback")
        _until(lambda: all(v == "1" for _, _, v in results[-8:]), what="answers from v1 again")
    finally:
        stop.set()
        for t in threads:
            t.join()
        if registry.version_by_alias(CLASSIFIER, registry.CHAMPION) != "1":  # the session's store, shared by tests
            registry.promote(CLASSIFIER, "1", "serving test: put back after a failure")
    assert {code for _, code, _ in results} == {200}, "no request failed during the swaps"
    versions = [v for _, _, v in results]
    first_v2, last_v2 = versions.index("2"), len(versions) - 1 - versions[::-1].index("2")
    assert set(versions[:first_v2]) == {"1"} and set(versions[last_v2 + 1:]) == {"1"}

    tags = MlflowClient().get_model_version(CLASSIFIER, "2").tags
    assert tags["kftune.serve.precision"] in ("fp32", "bf16", "int8")
    assert float(tags["kftune.serve.agreement_fp32"]) == 1 and float(tags["kftune.serve.texts_per_s_fp32"]) > 0
    assert "serve.precision=auto" in tags["kftune.serve.precision_reason"]

    # SIGTERM with requests in flight: each one answered before SIGTERM is in the log, with its version
    stop, late = threading.Event(), []
    threads = _hammer(url, stop, late, n_threads=3, prefix="late")
    _until(lambda: len(late) > 5, what="requests before SIGTERM")
    assert server.stop() == 0
    stop.set()
    for t in threads:
        t.join()
    answered = [(rid, v) for rid, code, v in results + late if code == 200]
    assert len(answered) > len(results)
    log = read_request_log(str(server.log_dir))
    logged = log.groupby("request_id")["version"].agg(["first", "size"])
    assert set(logged.index) == {rid for rid, _ in answered}, "every answered request was logged, nothing else"
    assert (logged["size"] == 2).all()
    assert dict(answered) == logged["first"].to_dict(), "logged with the version that answered"
    assert set(log["text"]) == {"gainoku said", "the lossira"} and set(log["labels"].map(tuple)) == {
        ("negative", "positive")}
    assert log["probabilities"].map(len).eq(2).all() and log["time"].is_monotonic_increasing
    assert "Traceback" not in server.log()


def test_an_unknown_model_fails_at_once_with_a_message(serve_store, monkeypatch, capsys):
    from kftune.serving.__main__ import main
    from tests.conftest import ROOT, use_mlflow_store

    use_mlflow_store(serve_store, monkeypatch)
    assert main(["--project-dir", str(serve_store), "serve", "--model", "no-such-model", "--params",
                 str(ROOT / "params.yaml")]) == 2
    assert "no registered model 'no-such-model'" in capsys.readouterr().err


def test_request_ids_are_unique_within_a_server_and_across_restarts():
    from kftune.serving.server import REQUEST_ID, request_ids

    first, restarted = request_ids(), request_ids()
    ids = [first() for _ in range(10_000)]
    again = restarted()
    assert len(set(ids)) == len(ids) and again not in ids
    assert all(REQUEST_ID.fullmatch(i) for i in [*ids, again])


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(start_server, serve_store, tmp_path, monkeypatch):
    """champion moves to a version whose weights are cut short: the server says so, counts it, stays ready and
    answers from the old version; once the alias moves back it never stopped."""
    import mlflow

    from tests.conftest import use_mlflow_store

    use_mlflow_store(serve_store, monkeypatch)
    client, name = MlflowClient(), f"tiny-broken-{tmp_path.name}"  # a rerun in the same session needs its own
    good = client.get_model_version(CLASSIFIER, "1")
    client.create_registered_model(name)
    client.create_model_version(name, good.source, run_id=good.run_id)  # v1: the classifier's v1 files
    files = next(Path(mlflow.artifacts.download_artifacts(f"models:/{CLASSIFIER}/1", dst_path=str(tmp_path))).rglob(
        "model.safetensors"))
    files.write_bytes(files.read_bytes()[: files.stat().st_size // 2])
    client.create_model_version(name, str(files.parents[1]), run_id=good.run_id)  # v2: the same, weights cut
    client.set_registered_model_alias(name, "champion", "1")
    server = start_server(name, ["serve.precision=fp32"])
    url = f"{server.url}/v1/models/{name}:predict"
    assert requests.post(url, json={"instances": ["the lossira"]}, timeout=10).json()["model_version"] == "1"

    client.set_registered_model_alias(name, "champion", "2")
    _until(lambda: f"could not load {name} v2, still serving 1" in server.log(), what="the failed load")
    answer = requests.post(url, json={"instances": ["the lossira"]}, timeout=10)
    assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    assert requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    assert "kftune_serve_model_load_failures_total 1.0" in metrics
    assert "model.safetensors" in server.log() and "Traceback" not in server.log()


def test_a_swapped_out_version_is_freed_once_its_requests_are_done(serve_store, monkeypatch):
    """The alias moves v1 -> v2: v1's weights must go with the swap, not stay until the next one (two versions
    resident, three while the next loads)."""
    import asyncio
    import gc
    import weakref

    from kftune.config import load_params
    from kftune.serving.server import State, follow_alias
    from tests.conftest import ROOT, use_mlflow_store

    use_mlflow_store(serve_store, monkeypatch)
    alias = {"version": "1"}  # what the registry's alias says; the versions loaded are the store's real ones
    monkeypatch.setattr(registry, "version_by_alias", lambda name, a: alias["version"])
    cfg = load_params(ROOT / "params.yaml", ["serve.poll_seconds=0.05", "serve.precision=fp32"]).serve
    state = State(CLASSIFIER, "champion", cfg, [])

    async def swap() -> bool:
        follow = asyncio.create_task(follow_alias(state))
        try:
            while state.current is None or state.current.version != "1":
                await asyncio.sleep(0.05)
            first = weakref.ref(state.current)
            alias["version"] = "2"
            while state.current.version != "2":
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # the loop went round again, still following the alias
            gc.collect()
            return first() is None
        finally:
            follow.cancel()

    assert asyncio.run(asyncio.wait_for(swap(), 120)), "the swapped-out version is still referenced"
