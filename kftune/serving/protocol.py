"""The wire formats: KServe V1 and Open Inference Protocol V2 requests in, answers out, and the limits.

Pure functions of parsed JSON, so every rule is testable without a server. Errors carry the HTTP
status and a message naming what was wrong (and the limit, where one was passed).
"""

from __future__ import annotations

import json

from kftune.config import ServeConfig
from kftune.serving.model import ServedModel


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def texts_from_v1(body) -> list:
    if not isinstance(body, dict) or "instances" not in body:
        raise HTTPError(422, 'expected {"instances": [text, ...]} (each a string or {"text": string})')
    items = body["instances"]
    if not isinstance(items, list):
        raise HTTPError(422, '"instances" must be a list')
    return [i["text"] if isinstance(i, dict) and "text" in i else i for i in items]


def texts_from_v2(body) -> list:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise HTTPError(422, 'expected {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [N], '
                             '"data": [text, ...]}]} with exactly one input')
    tensor = body["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("datatype") != "BYTES" or not isinstance(tensor.get("data"), list):
        raise HTTPError(422, 'inputs[0] must have "datatype": "BYTES" and a "data" list of texts')
    data = tensor["data"]
    if data and all(isinstance(d, list) and len(d) == 1 for d in data):  # shape [N, 1]
        data = [d[0] for d in data]
    shape = tensor.get("shape")
    if shape is not None and (not isinstance(shape, list) or not shape or shape[0] != len(data)
                              or any(d != 1 for d in shape[1:])):
        raise HTTPError(422, f"inputs[0].shape={str(shape)[:50]}: expected [{len(data)}] or [{len(data)}, 1] for "
                             f"the {len(data)} texts in data")
    return data


def check_texts(texts: list, cfg: ServeConfig) -> list[str]:
    """Every text a string within the limits; the error names the limit and the offending index."""
    if not texts:
        raise HTTPError(422, "no texts to predict")
    if len(texts) > cfg.max_texts:
        raise HTTPError(413, f"{len(texts)} texts in one request; the limit is serve.max_texts={cfg.max_texts}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise HTTPError(422, f"text {i} is a {type(t).__name__}, expected a string")
        if len(t) > cfg.max_text_chars:
            raise HTTPError(422, f"text {i} has {len(t)} characters; the limit is "
                                 f"serve.max_text_chars={cfg.max_text_chars}")
        if not valid_unicode(t):
            raise HTTPError(422, f"text {i} is not valid Unicode (a lone surrogate)")
    return texts


def valid_unicode(s: str) -> bool:
    """False for a string that JSON allows but UTF-8 cannot carry (a lone surrogate such as "\\ud800"): the
    tokenizer, the answer's encoding and the request log would all fail on it."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def v1_response(served: ServedModel, answers: list[dict]) -> dict:
    return {"predictions": [{**a, "model_version": served.version} for a in answers],
            "model_name": served.name, "model_version": served.version}


def v2_response(served: ServedModel, answers: list[dict], request_id: str) -> dict:
    n = len(answers)
    if served.task == "token-classification":
        outputs = [{"name": "entities", "datatype": "BYTES", "shape": [n],
                    "data": [json.dumps(a["entities"], ensure_ascii=False) for a in answers]}]
    else:
        outputs = [
            {"name": "label", "datatype": "BYTES", "shape": [n], "data": [a["label"] for a in answers]},
            {"name": "probability", "datatype": "FP32", "shape": [n], "data": [a["probability"] for a in answers]},
            {"name": "probabilities", "datatype": "FP32", "shape": [n, len(served.labels)],
             "data": [a["probabilities"][lbl] for a in answers for lbl in served.labels]},
        ]
    return {"model_name": served.name, "model_version": served.version, "id": request_id, "outputs": outputs,
            "parameters": {"labels": served.labels, "precision": served.precision}}


def v2_metadata(served: ServedModel) -> dict:
    outputs = ([{"name": "entities", "datatype": "BYTES", "shape": [-1]}] if served.task == "token-classification" else
               [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probability", "datatype": "FP32", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(served.labels)]}])
    return {"name": served.name, "versions": [served.version], "platform": "pytorch_transformers",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}], "outputs": outputs,
            "parameters": {"task": served.task, "labels": served.labels, "precision": served.precision,
                           "precision_reason": served.precision_reason, "batching": served.batching.reason}}
