"""A registered model version, loaded at its serving precision, warmed up, predicting raw texts."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field

from kftune.config import ConfigError, ServeConfig
from kftune.predict import PADDED, Batching
from kftune.serving import precision as prec

log = logging.getLogger(__name__)

TAG = "kftune.serve."
HELD_OUT = ("test", "validation")
DESCRIPTION_PREFIX = "Serving precision (serve.precision=auto):"


class ServingError(ConfigError):
    """A model cannot be served as asked (no such version or alias, unreadable artifacts)."""


@dataclass
class ServedModel:
    name: str
    version: str
    task: str
    labels: list[str]
    model: object = field(repr=False)
    tokenizer: object = field(repr=False)
    precision: str = "fp32"
    precision_reason: str = ""
    measured: dict = field(default_factory=dict)
    batching: Batching = PADDED  # how texts share forward passes, and why (kftune.predict.choose_batching)
    mask_pii: bool = False  # trained on texts read with ingest.mask_pii: the model sees them masked the same way

    def predict(self, texts: list[str], batch_size: int) -> list[dict]:
        """One answer per text, in order; texts share forward passes as `batching` says: packed into rows, or
        padded in length-sorted batches of `batch_size`.

        Sequence classification: label, probability, probabilities (every class). Token classification:
        entities (type, text, start, end, score, with character offsets into the text).
        """
        from kftune.predict import batched_logits, predict_spans, softmax

        if not texts:
            return []
        if self.task == "token-classification":  # masked word by word: the spans' offsets stay the text's
            return [{"entities": spans} for spans in predict_spans(self.model, self.tokenizer, texts, batch_size,
                                                                   self.mask_pii)]
        if self.mask_pii:
            from kftune.pii import mask
            from kftune.tables import normalise

            texts = [mask(normalise(t)) for t in texts]  # as ingest read the training texts
        seqs = self.tokenizer(texts, truncation=True, max_length=self.tokenizer.model_max_length)["input_ids"]
        probs = softmax(batched_logits(self.model, seqs, self.tokenizer.pad_token_id, batch_size, self.batching))
        best = probs.argmax(axis=1)
        return [{"label": self.labels[b], "probability": float(p[b]),
                 "probabilities": {lbl: float(x) for lbl, x in zip(self.labels, p)}} for b, p in zip(best, probs)]


def parse_model_ref(ref: str, default_alias: str = "champion") -> tuple[str, str | None, str | None]:
    """NAME, NAME@alias or NAME/version -> (name, alias, version)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        if not version.isdigit():
            raise ServingError(f"--model {ref!r}: after '/' comes a version number (or use NAME@alias)")
        return name, None, version
    return ref, default_alias, None


def resolve_version(name: str, alias: str | None, version: str | None) -> str:
    from kftune.registry import version_by_alias

    if version:
        return version
    found = version_by_alias(name, alias)
    if found is None:
        import mlflow

        raise ServingError(f"{name}@{alias}: no such alias (or no model {name!r}) in {mlflow.get_tracking_uri()}; "
                           f"`kftune models list --name {name}` shows the versions")
    return found


def version_reference(name: str, version: str, limit: int, calibration_rows: int) -> tuple[list[str], list[str], bool]:
    """The version's held-out and calibration texts (see `split_texts`), from its `reference/` artifact, and whether
    it trained on PII-masked texts (`ingest.mask_pii`, in its data card)."""
    from kftune.steps.resolve import download_reference

    with tempfile.TemporaryDirectory() as tmp:
        rows, card = download_reference(name, version, tmp)
    return (*split_texts(rows, limit, calibration_rows), bool((card.get("split") or {}).get("mask_pii")))


def split_texts(rows, limit: int, calibration_rows: int) -> tuple[list[str], list[str]]:
    """(test rows, then validation rows, up to `limit`: what agreement is measured on; the first
    `calibration_rows` training rows: what int8's smoothing is calibrated on) of a data version's rows."""
    held = rows[rows["split"].isin(HELD_OUT)]
    order = held["split"].map({s: i for i, s in enumerate(HELD_OUT)})
    held = held.assign(order=order).sort_values("order", kind="stable")
    train = rows[rows["split"] == "train"]
    return held["text"].astype(str).head(limit).tolist(), train["text"].astype(str).head(calibration_rows).tolist()


INT8_RECIPE = 2  # kftune.serving.int8's own version: a change to how int8 is built makes versions measure again


def int8_settings(cfg: ServeConfig) -> str:
    """serve.int8_* in words, and INT8_RECIPE: tagged with the measurements, which hold only for the int8 they
    measured."""
    return (f"recipe {INT8_RECIPE}, smoothing {cfg.int8_smoothing:g}, calibration rows {cfg.int8_calibration_rows}, "
            f"fallback margin {cfg.int8_fallback_margin:g}")


def int8_recipe(cfg: ServeConfig, tokenizer, calibration: list[str]) -> prec.Int8Recipe:
    """serve.int8_* as an Int8Recipe; without calibration texts (an older version), int8 is not smoothed."""
    seqs = tokenizer(calibration, truncation=True, max_length=tokenizer.model_max_length)["input_ids"] \
        if calibration else []
    return prec.Int8Recipe(cfg.int8_smoothing, seqs, tokenizer.pad_token_id, cfg.int8_fallback_margin,
                           unread_ids(tokenizer))


def unread_ids(tokenizer) -> tuple:
    """Token ids whose tag a tagger's answer never reads (kftune.predict.word_predictions reads each word's
    first sub-token): [CLS]/[SEP]-like specials (not [UNK]: it can start a word) and WordPiece's continuation
    pieces (`##...`), which never start a word."""
    ids = {i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id,
                       tokenizer.eos_token_id) if i is not None}
    prefix = getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", None)
    if prefix:
        ids |= {i for piece, i in tokenizer.get_vocab().items() if piece.startswith(prefix)}
    return tuple(sorted(ids))


def machine() -> str:
    """Where a measurement was taken: CPU model and its bf16/AVX-512 flags, and the GPU when there is one
    (measuring and serving use it whenever torch sees it)."""
    import torch

    from kftune.hardware import NATIVE_BF16_FLAGS, cpu_flags

    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    flags = sorted(f for f in cpu_flags() if f in NATIVE_BF16_FLAGS or f in ("avx512f", "avx512_vnni", "avx2"))
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model} ({', '.join(flags) or 'no AVX-512/bf16 flags'}), {len(os.sched_getaffinity(0))} cores{gpu}"


def recorded_precisions(tags: dict) -> tuple[dict[str, dict], str]:
    """The measurements `record_precisions` tagged on a version, and the machine they were taken on
    ({} and "" when the version has none, or no fp32 reference)."""
    measured = {}
    for p in prec.PRECISIONS:
        try:
            measured[p] = {"agreement": float(tags[f"{TAG}agreement_{p}"]),
                           "texts_per_s": float(tags[f"{TAG}texts_per_s_{p}"])}
            if f"{TAG}batching_{p}" in tags:
                measured[p]["batching"] = tags[f"{TAG}batching_{p}"]
        except (KeyError, ValueError):
            continue
    if "fp32" not in measured:
        return {}, ""
    return measured, tags.get(f"{TAG}measured_on", "")


def measure_and_choose(model, tokenizer, task: str, texts: list[str], cfg: ServeConfig, device: str,
                       int8: prec.Int8Recipe, built: dict | None = None) -> tuple[prec.Choice, dict, list[str]]:
    """Measure the precisions worth trying on this device on `texts` and apply the auto rule (`built`: see
    measure_precisions)."""
    todo, skipped = prec.candidates(device)
    measured = prec.measure_precisions(model, tokenizer, texts, task, todo, cfg.max_batch, int8, built)
    choice = prec.choose_precision("auto", measured, cfg.min_agreement, cfg.min_speedup)
    if skipped:
        choice = prec.Choice(choice.value, f"{choice.reason}; not measured: {'; '.join(skipped)}")
    return choice, measured, skipped


def record_precisions(name: str, version: str, precision: str, reason: str, measured: dict,
                      skipped: list[str] = (), when: str = "at load", int8: str = "") -> None:
    """Tag a version with each measured precision's agreement and texts/s and the choice with its reason,
    and say the choice in the version's description (what its page in the MLflow UI shows first).

    Best effort: a read-only registry costs a warning, not the caller's work (serving or registering).
    """
    import mlflow

    where = machine()
    tags = {f"{TAG}precision": precision, f"{TAG}precision_reason": reason, f"{TAG}measured_on": where,
            f"{TAG}measured_when": when, f"{TAG}int8_settings": int8}
    for p, m in measured.items():
        tags[f"{TAG}agreement_{p}"] = repr(m["agreement"])  # whole: rounded, 0.99496 would pass a 0.995 minimum
        tags[f"{TAG}texts_per_s_{p}"] = f"{m['texts_per_s']:g}"
        if m.get("batching"):
            tags[f"{TAG}batching_{p}"] = m["batching"]
        if "fp32_share" in m:
            tags[f"{TAG}fp32_share_{p}"] = f"{m['fp32_share']:.4f}"
    if skipped:
        tags[f"{TAG}not_measured"] = "; ".join(skipped)
    line = f"{DESCRIPTION_PREFIX} {precision} on {where} (measured {when}): {reason}"
    try:
        client = mlflow.MlflowClient()
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v[:5000])
        # the model card (kftune.card) may be there already: replace only our own paragraph, at the end
        paras = [p.strip("\n") for p in (client.get_model_version(name, version).description or "").split("\n\n")]
        kept = [p for p in paras if p.strip() and not p.startswith(DESCRIPTION_PREFIX)]
        card = "\n\n".join(kept)[: max(0, 5000 - len(line) - 2)]  # MLflow's SQL stores keep 5000 characters
        client.update_model_version(name, version, description=f"{card}\n\n{line}" if card else line[:5000])
    except Exception as exc:  # noqa: BLE001 - serving must not fail because tags cannot be written
        log.warning("could not tag %s v%s with its serving precision: %s", name, version, exc)


def measure_at_registration(name: str, version: str, model_dir, rows, task: str,
                            cfg: ServeConfig) -> prec.Choice | None:
    """Measure a just-registered version's precisions on its held-out texts (`split_texts` of `rows`, its data
    version, as load_version reads them back from the reference artifact) from the fine-tuned folder, and
    record them on the version, so `serve.precision=auto` on this machine needs no measurement at load.
    Best effort: a failure is a warning (serving measures then)."""
    import time

    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    texts, calibration = split_texts(rows, cfg.agreement_rows, cfg.int8_calibration_rows)
    if not texts:
        return None
    start = time.perf_counter()
    try:
        auto = AutoModelForTokenClassification if task == "token-classification" else \
            AutoModelForSequenceClassification
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = auto.from_pretrained(model_dir).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        int8 = int8_recipe(cfg, tokenizer, calibration)
        choice, measured, skipped = measure_and_choose(model, tokenizer, task, texts, cfg, device, int8)
    except Exception as exc:  # noqa: BLE001 - a registered version is still servable; `auto` measures at load
        log.warning("%s v%s: could not measure serving precisions (serving will measure at load): %s: %s",
                    name, version, type(exc).__name__, exc)
        return None
    record_precisions(name, version, choice.value, choice.reason, measured, skipped, when="at registration",
                      int8=int8_settings(cfg))
    log.info("%s v%s: auto would serve %s (measured on %d held-out texts in %.1f s)", name, version, choice.value,
             len(texts), time.perf_counter() - start)
    return choice


def load_version(name: str, version: str, cfg: ServeConfig, precision: str | None = None) -> ServedModel:
    """Load `name` v`version` from the registry, pick its precision (measuring it for auto), warm it up.

    Args:
        precision: overrides cfg.precision (auto | fp32 | bf16 | int8).
    """
    import mlflow
    import torch

    setting = precision or cfg.precision
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from kftune.registry import load_components  # a LoRA version: its adapter merged into the base

        parts = load_components(f"models:/{name}/{version}")
    except Exception as exc:
        raise ServingError(f"cannot load {name} v{version} from {mlflow.get_tracking_uri()}: "
                           f"{type(exc).__name__}: {exc}") from None
    model, tokenizer = parts["model"], parts["tokenizer"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    task = "token-classification" if type(model).__name__.endswith("ForTokenClassification") else \
        "sequence-classification"
    from kftune.predict import labels_of

    try:
        texts, calibration, masked = version_reference(name, version, cfg.agreement_rows, cfg.int8_calibration_rows)
    except Exception as exc:  # noqa: BLE001 - an older version without reference rows can still be served
        log.warning("%s v%s: no held-out rows to measure precision on (%s)", name, version, exc)
        texts, calibration, masked = [], [], False
    int8 = int8_recipe(cfg, tokenizer, calibration)
    measured, skipped, fresh, built = {}, [], False, {}
    if setting == "auto":
        tags = mlflow.MlflowClient().get_model_version(name, version).tags
        measured, where = recorded_precisions(tags)
        usable = {p: m for p, m in measured.items() if p in prec.candidates(device)[0]}
        if measured and where == machine() and tags.get(f"{TAG}int8_settings") == int8_settings(cfg):
            choice = prec.choose_precision("auto", usable, cfg.min_agreement, cfg.min_speedup)
            choice = prec.Choice(choice.value, f"{choice.reason} (as measured earlier on this machine, tagged "
                                               f"on the version)")
        elif texts:
            fresh = True
            choice, measured, skipped = measure_and_choose(model, tokenizer, task, texts, cfg, device, int8, built)
        else:
            choice = prec.Choice("fp32", "serve.precision=auto, but the version has no held-out rows to measure "
                                         "agreement on: fp32")
    else:
        if setting == "bf16" and not prec.bf16_native(device).value:
            log.warning("serve.precision=bf16 but %s: expect it to be much slower than fp32",
                        prec.bf16_native(device).reason)
        choice = prec.choose_precision(setting, {}, cfg.min_agreement)
    converted = built.pop(choice.value, None)  # measured: built already (holding the measured copies until the
    built.clear()  # choice: MiniLM's peak RSS 931-940 MiB against 900-918 MiB freeing each after its measurement)
    if converted is None:
        converted = prec.convert(model, choice.value, int8)
    served = ServedModel(name, str(version), task, labels_of(model), converted, tokenizer, choice.value, choice.reason,
                         measured, mask_pii=masked)
    warm = (texts or ["warm up"])[: cfg.max_batch]
    served.predict(warm, cfg.max_batch)  # first-call costs paid before the version takes traffic
    served.predict(sorted(warm, key=len)[-1:] * 2, cfg.max_batch)
    if task != "token-classification":
        from kftune.predict import choose_batching

        seqs = tokenizer((texts or warm)[: 4 * cfg.max_batch], truncation=True,
                         max_length=tokenizer.model_max_length)["input_ids"]
        served.batching = choose_batching(served.model, seqs, tokenizer.pad_token_id, cfg.max_batch)
    log.info("%s v%s ready: %s at %s (%s); %s", name, version, task, served.precision, served.precision_reason,
             served.batching.reason)
    if fresh:
        record_precisions(name, str(version), served.precision, served.precision_reason, measured, skipped,
                          int8=int8_settings(cfg))
    return served

