"""Which numeric precision to serve: fp32, bf16 (only where native) or int8, chosen by measurement.

int8 is more than `quantize_dynamic`: plain per-tensor dynamic int8 changed the label of 2-6% of held-out texts
(93.6-98.0% agreement with fp32 on four MiniLM classifiers), because a few activation channels carry values ~15x
the median and set the whole tensor's scale. `Int8Recipe` adds SmoothQuant's per-channel smoothing (calibrated
on training rows), per-channel weight scales, and recomputes in fp32 the texts int8 is unsure of.

`measure_precisions` runs each candidate on the same texts and reports its agreement with fp32 and its
speed; `choose_precision` is the rule. Both are plain functions, so the register step can call the
first at registration time and a test can check the second on made-up numbers.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

from kftune.hardware import Choice, choose_bf16, cpu_flags

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")


def bf16_native(device: str) -> Choice:
    """Whether bf16 is computed natively here (a CPU without AVX512_BF16/AMX emulates it, many times slower)."""
    import torch

    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return choose_bf16("auto", device, cuda_bf16, cpu_flags())


def candidates(device: str) -> tuple[list[str], list[str]]:
    """(precisions worth measuring here, why each other one is not)."""
    out, skipped = ["fp32"], []
    native = bf16_native(device)
    (out if native.value else skipped).append("bf16" if native.value else f"bf16: {native.reason.split(': ', 1)[-1]}")
    if device == "cpu":
        out.append("int8")
    else:
        skipped.append("int8: torch dynamic quantisation runs on CPU only")
    return out, skipped


@dataclass(frozen=True)
class Int8Recipe:
    """How the int8 copy is built (serve.int8_* in params.yaml); the defaults build plain per-channel int8.

    smoothing: SmoothQuant's migration strength alpha; 0 turns smoothing off. Each Linear's input channel j
        is divided by s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) and its weight column multiplied by it, so
        the layer computes the same function while activation outliers move into the (per-channel) weights.
    calibration: token-id sequences whose activations give max|x_j| (training rows, not the measured ones).
    fallback_margin: a text whose int8 top-two probability margin is below this (for token classification: at
        its least certain token an answer reads) is recomputed in fp32; 0 never recomputes.
    """
    smoothing: float = 0.0
    calibration: list = field(default_factory=list, repr=False)
    pad_id: int = 0
    fallback_margin: float = 0.0
    unread_ids: tuple = ()  # tokens whose tag no answer reads: a tagger's fallback ignores their margins


def convert(model, precision: str, int8: Int8Recipe = Int8Recipe()):
    """A copy of `model` at `precision` (fp32 returns the model itself; so does the fp32 fallback inside int8).

    int8 is torch's dynamic quantisation of every Linear layer (weights int8 per output channel, activations
    quantised per batch), after `int8.smoothing`, behind `int8.fallback_margin`. torch 2.13 still ships it in
    torch.ao.quantization, deprecated in favour of torchao.
    """
    import torch

    if precision == "fp32":
        return model
    if precision == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    if precision == "int8":
        from kftune.serving.int8 import quantise

        return quantise(model, int8.smoothing, int8.calibration, int8.pad_id, int8.fallback_margin, int8.unread_ids)
    raise ValueError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")


def served_outputs(model, tokenizer, task: str, probe: list[str], batch_size: int):
    """(texts -> what agreement compares, how texts are batched): the path `kftune serve` and `kftune predict` run
    at this precision. Text classification: the label id per text, batched as `choose_batching` decides on
    `probe` (packed rows where they give padded batches' answers). Token classification: the entity spans
    (type, start, end) per text, in padded batches."""
    from kftune.predict import PADDED, batched_logits, choose_batching, predict_spans

    def ids(texts):
        return tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]

    if task == "token-classification":
        return (lambda texts: [tuple((s["type"], s["start"], s["end"]) for s in spans)
                               for spans in predict_spans(model, tokenizer, texts, batch_size)]), PADDED
    batching = choose_batching(model, ids(probe), tokenizer.pad_token_id, batch_size)
    return (lambda texts: batched_logits(model, ids(texts), tokenizer.pad_token_id, batch_size,
                                         batching).argmax(axis=1).tolist()), batching


def measure_precisions(model, tokenizer, texts: list[str], task: str = "sequence-classification",
                       precisions: list[str] = PRECISIONS, batch_size: int = 32,
                       int8: Int8Recipe = Int8Recipe(), built: dict | None = None) -> dict[str, dict]:
    """Agreement with fp32 and texts/s of each precision on `texts`, on this machine, batched as served.

    Args:
        model: the fp32 model (left unchanged).
        tokenizer: its fast tokenizer.
        texts: held-out texts (the version's own test/validation rows).
        task: sequence-classification (agreement: same label) or token-classification (same entity spans).
        precisions: which to measure; fp32 is always measured, as the reference.
        batch_size: texts per forward pass, as served.
        int8: how the int8 copy is built, as served.
        built: if given, receives each measured copy by precision, so the one chosen need not be built again.

    Returns:
        {precision: {"agreement": share of texts with fp32's prediction, "texts_per_s": float,
        "batching": "packed" or "padded"}}; int8 with a fallback adds "fp32_share", the share of texts it
        recomputed in fp32. Packing is faster where it applies, and int8 never keeps it, so speeds measured on
        padded batches alone could rank the precisions differently from how they serve.
    """
    if not texts:
        raise ValueError("measure_precisions needs at least one text")
    out, reference = {}, None
    for precision in ["fp32", *[p for p in precisions if p != "fp32"]]:
        m = convert(model, precision, int8)
        run, batching = served_outputs(m, tokenizer, task, texts[: 4 * batch_size], batch_size)
        if task == "token-classification":  # a classifier's choice of batching ran both paths: warm already
            run(texts[:batch_size])  # warm-up: first-call allocations, kernels
        fallback = hasattr(m, "reset_counts")  # int8's FallbackToFp32: count the measured texts only
        if fallback:
            m.reset_counts()
        start = time.perf_counter()
        got = run(texts)
        seconds = time.perf_counter() - start
        reference = got if reference is None else reference
        agree = sum(a == b for a, b in zip(got, reference)) / len(texts)
        how = "packed" if batching.packed else "padded"
        out[precision] = {"agreement": round(agree, 6), "texts_per_s": round(len(texts) / seconds, 1), "batching": how}
        if fallback and m.seen:
            out[precision]["fp32_share"] = round(m.recomputed / m.seen, 4)
            m.reset_counts()
        if built is not None:
            built[precision] = m
        log.info("precision %s: agreement %.4f with fp32, %.1f texts/s on %d texts (%s)%s", precision, agree,
                 len(texts) / seconds, len(texts), how,
                 f", {out[precision]['fp32_share']:.1%} recomputed in fp32" if "fp32_share" in out[precision] else "")
    return out


def choose_precision(setting: str, measured: dict[str, dict], min_agreement: float, min_speedup: float = 1.0) -> Choice:
    """The rule: a fixed setting is served as set; auto serves the fastest measured precision whose agreement
    with fp32 is >= min_agreement and, unless it is fp32, whose speed is >= min_speedup x fp32's (a tie within
    the measurement's noise keeps fp32)."""
    if setting != "auto":
        return Choice(setting, f"serve.precision={setting}")
    fp32 = measured["fp32"]["texts_per_s"]
    agree = {p for p, m in measured.items() if m["agreement"] >= min_agreement}
    fast = {p for p, m in measured.items() if p == "fp32" or m["texts_per_s"] >= min_speedup * fp32}
    ok = {p: measured[p] for p in agree & fast}
    best = max(ok, key=lambda p: ok[p]["texts_per_s"])
    numbers = "; ".join(f"{p} {m['texts_per_s']:g} texts/s{' ' + m['batching'] if m.get('batching') else ''}, "
                        f"agreement {m['agreement']:.4f}"
                        + (f" ({m['fp32_share']:.1%} recomputed in fp32)" if "fp32_share" in m else "")
                        for p, m in measured.items())
    why = f"fastest with agreement >= {min_agreement:g}: {best} ({ok[best]['texts_per_s'] / fp32:.2f}x fp32)"
    if failed := [p for p in measured if p not in agree]:
        why += f"; below the agreement bar: {', '.join(failed)}"
    if slow := [p for p in measured if p in agree and p not in fast]:
        why += f"; less than {min_speedup:g}x fp32: {', '.join(slow)}"
    return Choice(best, f"serve.precision=auto, {why} [{numbers}]")
