"""Typed, validated settings loaded from params.yaml.

params.yaml is the only place defaults live: every field here is required, so a
key missing from the file is reported instead of silently taking a value from code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kftune.hardware import BF16_SETTINGS

WEBHOOK_ENV = "KFTUNE_WEBHOOK_URL"  # the webhook URL from the environment: a cluster Secret, never a parameter
SECRET_PARAMS = ("monitor.webhook_url",)  # credentials (a Slack or Teams webhook URL): never logged, nor hashed

TASKS = ("sequence-classification", "token-classification")


class KftuneError(Exception):
    """An error a person can fix from its message alone; the CLI prints it without a traceback (exit 2)."""


class ConfigError(KftuneError, ValueError):
    """One or more settings are invalid; the message lists every problem."""


SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit


def _seed_problem(key: str, value: int) -> list[str]:
    return [] if 0 <= value <= SEED_MAX else [f"{key}={value}: must be in [0, 2**32 - 1]"]


def _doc(text: str):
    return field(metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = _doc("Base encoder: minilm-l6, bert-tiny, a local model folder, or a Hugging Face hub id.")


@dataclass
class IngestConfig:
    text_column: str = _doc("Column holding the text.")
    label_column: str = _doc("Column holding the label.")
    encoding: str = _doc("Encoding of CSV/TSV/JSONL files.")
    labels: list[str] = _doc("Allowed labels in order (token classification: allowed tags such as O, B-person, "
                             "I-person); empty means infer them from the data.")
    validation_fraction: float = _doc("Share of texts hashed into the validation split.")
    test_fraction: float = _doc("Share of texts hashed into the test split.")
    split_salt: str = _doc("Salt of the split hash; changing it reshuffles every text, so keep it for a dataset's life.")
    conll_tag_column: int = _doc("Token classification, CoNLL files: 0-based column holding the tag (-1: the last).")
    bio_repair: bool = _doc("Token classification: turn an I-X that does not continue an X entity into B-X (and "
                            "count it) instead of failing.")
    mask_pii: bool = _doc("Replace e-mail addresses, phone numbers, payment cards, IBANs, IP addresses and URLs in "
                          "the texts with typed placeholders (<EMAIL>, ...) as they are read (kftune/pii.py); "
                          "in tagged sentences each token a value touches (tags stay aligned).")

    def problems(self) -> list[str]:
        out = []
        for key in ("validation_fraction", "test_fraction"):
            if not 0 < getattr(self, key) < 0.5:
                out.append(f"ingest.{key}={getattr(self, key)!r}: must be > 0 and < 0.5")
        if len(set(self.labels)) != len(self.labels):
            out.append(f"ingest.labels={self.labels!r}: labels must be unique")
        if self.labels and len(self.labels) < 2:
            out.append(f"ingest.labels={self.labels!r}: need at least 2 labels")
        try:
            "".encode(self.encoding)
        except LookupError:
            out.append(f"ingest.encoding={self.encoding!r}: unknown encoding")
        return out


@dataclass
class TokenizeConfig:
    max_length: int = _doc("Longest sequence in tokens; longer texts are truncated (token classification: split "
                           "into windows of whole words), and counted.")
    label_all_subtokens: bool = _doc("Token classification: label every sub-token of a word (B- becomes I- after "
                                     "the first) instead of only the first.")

    def problems(self) -> list[str]:
        return [] if 8 <= self.max_length <= 512 else [f"tokenize.max_length={self.max_length!r}: must be in [8, 512]"]


@dataclass
class FinetuneConfig:
    seed: int = _doc("Seed for weights init of the head, dropout and batch order.")
    epochs: int = _doc("Passes over the training split (ignored when max_steps > 0); 0 means by task: 3 for text "
                       "classification, 5 for token classification, whose rarer entity types were still improving "
                       "on validation after 3 (WNUT-17, benchmarks/recipes.py).")
    max_steps: int = _doc("Optimizer steps to run; 0 means use epochs.")
    batch_size: int = _doc("Examples per forward pass.")
    grad_accum_steps: int = _doc("Forward passes per optimizer step (effective batch = batch_size x this).")
    learning_rate: float = _doc("Peak AdamW learning rate.")
    weight_decay: float = _doc("AdamW weight decay (not applied to biases and LayerNorm).")
    warmup_ratio: float = _doc("Share of steps with linear warm-up; the rest decays linearly to 0.")
    max_grad_norm: float = _doc("Gradient clipping norm; 0 disables clipping.")
    eval_every_steps: int = _doc("Validate every N optimizer steps; 0 means at the end of each epoch.")
    early_stopping_patience: int = _doc("Stop after this many validations without a better macro-F1; 0 disables.")
    freeze_embeddings: bool = _doc("Freeze the embedding layer.")
    freeze_layers: int = _doc("Freeze the bottom k encoder layers.")
    group_by_length: bool = _doc("Batch texts of similar length (batches are still shuffled).")
    micro_batch_tokens: int = _doc("A batch with more padded tokens than this runs as several forward and backward "
                                   "passes: the same gradient without the long batch's activations in memory; "
                                   "0 disables.")
    bf16: str = _doc("bf16 autocast for training, evaluation and drift embeddings: auto (only where the hardware "
                     "computes bf16 natively: a CUDA device with bf16, a CPU with AVX512_BF16 or AMX), true "
                     "(force; warns where emulated, which is many times slower), false.")
    threads: int = _doc("torch intra-op threads; 0 means the cores this process may use (CPU affinity and cgroup "
                        "quota), not the host's count.")
    log_every_steps: int = _doc("Log loss and learning rate to MLflow every N optimizer steps.")
    checkpoint_every_steps: int = _doc("Save a resumable checkpoint every N optimizer steps; 0 disables.")
    method: str = _doc("full (every weight trains) or lora (low-rank adapters on the attention query and value "
                       "projections plus the head, through peft; registered as a small adapter version, merged "
                       "into the weights for evaluation and serving).")
    lora_r: int = _doc("LoRA rank.")
    lora_alpha: int = _doc("LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).")
    lora_dropout: float = _doc("Dropout on the LoRA branch.")
    lora_learning_rate: float = _doc("Peak AdamW learning rate with method=lora, instead of learning_rate: the few "
                                     "adapter weights need a higher rate than full fine-tuning.")
    restarts: int = _doc("Texts: train again from the next seed, at most this many times, when the best "
                         "validation never predicts a label that has >= 5 validation rows (a collapsed run, a "
                         "known failure of fine-tuning on small data); the better run is kept, the cost is in "
                         "the train summary. 0 disables.")

    @property
    def peak_learning_rate(self) -> float:
        return self.lora_learning_rate if self.method == "lora" else self.learning_rate

    def __post_init__(self):
        if str(self.bf16).lower() in YAML11_SWITCHES:  # a switch as well as `auto`
            self.bf16 = str(YAML11_SWITCHES[self.bf16.lower()]).lower()

    def problems(self) -> list[str]:
        out = _seed_problem("finetune.seed", self.seed)
        positive = ("batch_size", "grad_accum_steps", "log_every_steps")
        non_negative = ("epochs", "max_steps", "eval_every_steps", "early_stopping_patience", "freeze_layers",
                        "threads", "checkpoint_every_steps", "weight_decay", "max_grad_norm", "restarts",
                        "micro_batch_tokens")
        out += [f"finetune.{k}={getattr(self, k)!r}: must be > 0" for k in positive if getattr(self, k) <= 0]
        out += [f"finetune.{k}={getattr(self, k)!r}: must be >= 0" for k in non_negative if getattr(self, k) < 0]
        for key in ("learning_rate", "lora_learning_rate"):
            if not 0 < getattr(self, key) < 1:
                out.append(f"finetune.{key}={getattr(self, key)!r}: must be in (0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"finetune.warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        if self.bf16 not in BF16_SETTINGS:
            out.append(f"finetune.bf16={self.bf16!r}: must be one of {', '.join(BF16_SETTINGS)}")
        if self.method not in ("full", "lora"):
            out.append(f"finetune.method={self.method!r}: must be full or lora")
        if self.lora_r < 1 or self.lora_alpha < 1:
            out.append(f"finetune.lora_r={self.lora_r!r}, lora_alpha={self.lora_alpha!r}: must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"finetune.lora_dropout={self.lora_dropout!r}: must be in [0, 1)")
        return out


@dataclass
class EvaluateConfig:
    batch_size: int = _doc("Examples per forward pass when predicting.")
    ece_bins: int = _doc("Confidence bins for the expected calibration error.")
    tfidf_ngram_max: int = _doc("Longest word n-gram of the TF-IDF baseline.")
    tfidf_c: float = _doc("Inverse regularisation strength of the baseline's logistic regression.")

    def problems(self) -> list[str]:
        out = [f"evaluate.{k}={getattr(self, k)!r}: must be > 0"
               for k in ("batch_size", "ece_bins", "tfidf_ngram_max", "tfidf_c") if getattr(self, k) <= 0]
        return out


@dataclass
class RegisterConfig:
    model_name: str = _doc("Registered model name in the MLflow registry.")
    experiment: str = _doc("MLflow experiment for training runs.")
    min_delta: float = _doc("Challenger must reach champion macro-F1 + min_delta on the same test split.")
    require_approval: bool = _doc("Leave a passing challenger awaiting `kftune models promote` instead of promoting.")
    smoke_examples: int = _doc("Test texts predicted through the registry URI before promotion.")
    max_forgetting: float = _doc("Retraining: the challenger may lose at most this much macro-F1 against the champion "
                                 "on the frozen historical test split.")
    golden_test: str = _doc("A fixed labelled test file (texts, or CoNLL/JSONL sentences) on which the gate "
                            "re-scores champion and challenger every time; a challenger losing more than "
                            "max_forgetting on it is held. Empty: none.")
    keep_versions: int = _doc("After each promotion, keep the newest N unprotected versions and delete older ones, "
                              "as `kftune models prune --keep N` does (champion, previous-champion, a challenger "
                              "and one awaiting approval are always kept); 0 keeps every version.")

    def problems(self) -> list[str]:
        out = []
        if not -1 <= self.min_delta < 1:  # negative: a challenger up to that much worse is promoted
            out.append(f"register.min_delta={self.min_delta!r}: must be in [-1, 1)")
        if not 0 <= self.max_forgetting < 1:
            out.append(f"register.max_forgetting={self.max_forgetting!r}: must be in [0, 1)")
        if not self.model_name.strip():
            out.append("register.model_name is empty")
        if not self.experiment.strip():
            out.append("register.experiment is empty")
        if self.smoke_examples < 1:
            out.append(f"register.smoke_examples={self.smoke_examples!r}: must be >= 1")
        if self.keep_versions < 0:
            out.append(f"register.keep_versions={self.keep_versions!r}: must be >= 0 (0 keeps every version)")
        return out


DRIFT_METHODS = ("embedding", "prediction", "confidence", "vocabulary", "label", "entities")


@dataclass
class DriftConfig:
    methods: list[str] = _doc(f"Tests that vote on drift, from {', '.join(DRIFT_METHODS)}; all are always logged.")
    min_flags: int = _doc("Drift is declared when at least this many voting tests flag it.")
    alpha: float = _doc("Significance level of the p-value tests (embedding MMD, confidence KS, chi-squared beside PSI).")
    psi_threshold: float = _doc("PSI above which the predicted-label or true-label distribution has drifted "
                                 "(when the chi-squared test also has p < alpha).")
    oov_increase: float = _doc("Rise in the share of words unseen in training above which vocabulary has drifted.")
    unseen_entity_increase: float = _doc("Token classification: rise in the share of predicted entities whose surface "
                                         "form was never an entity in training, above which entities have drifted.")
    permutations: int = _doc("Permutations of the MMD test (p-value resolution is 1 / (permutations + 1)).")
    max_rows: int = _doc("Rows per side compared (a seeded sample when there are more).")
    batch_size: int = _doc("Texts per forward pass when embedding.")
    seed: int = _doc("Seed of the row samples and permutations.")

    def problems(self) -> list[str]:
        out = [f"drift.methods: unknown method {m!r} (known: {', '.join(DRIFT_METHODS)})"
               for m in self.methods if m not in DRIFT_METHODS]
        out += [f"drift.methods: {m!r} is listed twice (its flag would count twice)"
                for m in sorted({m for m in self.methods if self.methods.count(m) > 1})]
        if not self.methods:
            out.append("drift.methods is empty: list at least one test (drift could never be declared)")
        out += _seed_problem("drift.seed", self.seed)
        if not 1 <= self.min_flags <= max(len(self.methods), 1):
            out.append(f"drift.min_flags={self.min_flags}: must be in [1, len(drift.methods)={len(self.methods)}]")
        if not 0 < self.alpha < 0.5:
            out.append(f"drift.alpha={self.alpha!r}: must be in (0, 0.5)")
        out += [f"drift.{k}={getattr(self, k)!r}: must be > 0" for k in
                ("psi_threshold", "oov_increase", "unseen_entity_increase", "permutations", "max_rows", "batch_size")
                if getattr(self, k) <= 0]
        if self.permutations > 0 and 1 / (self.permutations + 1) >= self.alpha:
            out.append(f"drift.permutations={self.permutations}: too few to reach p < drift.alpha={self.alpha}")
        return out


WARM_START_FACTOR = 0.3  # retrain.learning_rate: auto


@dataclass
class RetrainConfig:
    min_new_rows: int = _doc("Retrain without drift once this many new rows have arrived.")
    min_new_test_rows: int = _doc("Compare a challenger on new data only when the new rows give at least this many "
                                  "test rows.")
    replay_fraction: float = _doc("Share of the historical training rows mixed into the challenger's training set.")
    warm_start: str = _doc("Start the challenger from the `champion`'s weights or from the `base` model.")
    learning_rate: str = _doc("Peak learning rate of a challenger that warm-starts from the champion (its weights "
                              "are already tuned: a fresh run's finetune.learning_rate moves them too far): a number, "
                              "or auto = 0.3 x finetune.learning_rate (with method=lora, of lora_learning_rate). "
                              "A challenger from the base model uses "
                              "finetune.learning_rate.")
    cooldown_hours: float = _doc("No retraining within this many hours of the last promotion, unless forced.")
    allow_label_change: bool = _doc("Accept new data whose labels are not the champion's (the challenger "
                                    "then starts from the base model).")

    def warm_learning_rate(self, fresh: float) -> float:
        """The rate of a warm-started challenger: retrain.learning_rate, or auto: WARM_START_FACTOR x the fresh
        rate (MiniLM-L6 1e-4 -> 3e-5, the earlier fixed default; bert-tiny 1e-3 -> 3e-4, which on newer WNUT-17
        text gained 12 entity-F1 points without losing any on the old)."""
        return fresh * WARM_START_FACTOR if str(self.learning_rate) == "auto" else float(self.learning_rate)

    def problems(self) -> list[str]:
        out = []
        for k in ("min_new_rows", "min_new_test_rows"):
            if getattr(self, k) < 1:
                out.append(f"retrain.{k}={getattr(self, k)}: must be >= 1")
        if not 0 <= self.replay_fraction <= 1:
            out.append(f"retrain.replay_fraction={self.replay_fraction!r}: must be in [0, 1]")
        try:
            if str(self.learning_rate) != "auto" and not 0 < float(self.learning_rate) < 1:
                out.append(f"retrain.learning_rate={self.learning_rate!r}: must be in (0, 1), or auto")
        except ValueError:
            out.append(f"retrain.learning_rate={self.learning_rate!r}: must be a number in (0, 1), or auto")
        if self.warm_start not in ("champion", "base"):
            out.append(f"retrain.warm_start={self.warm_start!r}: must be champion or base")
        if self.cooldown_hours < 0:
            out.append(f"retrain.cooldown_hours={self.cooldown_hours!r}: must be >= 0")
        return out


@dataclass
class ClusterConfig:
    finetune_cpu: str = _doc("CPU request and limit of the fine-tune task on a cluster (Kubernetes quantity).")
    finetune_memory: str = _doc("Memory request and limit of the fine-tune task (e.g. 8G).")
    finetune_gpus: int = _doc("GPUs for the fine-tune task; 0 runs it on CPU.")
    accelerator_type: str = _doc("Kubernetes resource name of the GPUs (nvidia.com/gpu).")
    retries: int = _doc("Retries of the idempotent training tasks (ingest, tokenize, fine-tune, evaluate, resolve, "
                        "drift) after a transient failure (pod eviction, node loss); register and promote never.")
    mlflow_secret: str = _doc("Kubernetes Secret whose keys become env vars of every task (MLflow URI).")
    s3_secret: str = _doc("Kubernetes Secret with the S3/MinIO keys and endpoints, as env vars of every task.")
    webhook_secret: str = _doc(f"Kubernetes Secret whose key {WEBHOOK_ENV} the monitoring task reads as the webhook "
                               "URL when monitor.sinks has webhook (a compiled pipeline never carries "
                               "monitor.webhook_url).")

    def problems(self) -> list[str]:
        out = []
        if self.finetune_gpus < 0:
            out.append(f"cluster.finetune_gpus={self.finetune_gpus}: must be >= 0")
        if not 0 <= self.retries <= 10:
            out.append(f"cluster.retries={self.retries}: must be in [0, 10]")
        if not re.fullmatch(r"\d+(\.\d+)?m?", self.finetune_cpu):
            out.append(f"cluster.finetune_cpu={self.finetune_cpu!r}: not a CPU quantity like 2 or 500m")
        if not re.fullmatch(r"\d+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?", self.finetune_memory):  # KFP's own pattern
            out.append(f"cluster.finetune_memory={self.finetune_memory!r}: not a memory quantity like 8G or 8Gi "
                       f"(whole numbers: 1536M, not 1.5G)")
        return out


SERVE_PRECISIONS = ("auto", "fp32", "bf16", "int8")


@dataclass
class ServeConfig:
    poll_seconds: float = _doc("How often `kftune serve` checks which version the alias points at; a new one is "
                               "loaded and warmed beside the old, then swapped in.")
    max_batch: int = _doc("Most texts in one forward pass; concurrent requests are gathered up to this.")
    max_wait_ms: float = _doc("How long a batch waits for one more request (again after each arrival, 8 times at most).")
    max_queue: int = _doc("Load shedding: most texts waiting or in the forward pass; a request beyond it gets a 503 "
                          "with Retry-After at once instead of a long wait. 0: no limit.")
    precision: str = _doc("auto (the fastest of fp32, bf16 where native, int8 whose agreement with fp32 on the "
                          "version's held-out rows is >= min_agreement, measured at load), fp32, bf16 or int8.")
    min_agreement: float = _doc("precision=auto: least share of held-out predictions equal to fp32's.")
    min_speedup: float = _doc("precision=auto: bf16 or int8 is served only if measured at least this many times as "
                              "fast as fp32 (a tie within the measurement's noise keeps fp32).")
    agreement_rows: int = _doc("precision=auto: held-out rows (test, then validation) measured per precision.")
    int8_smoothing: float = _doc("int8: SmoothQuant migration strength alpha in [0, 1]: activation outliers moved into "
                                 "the per-channel weight scales before quantising; 0 turns it off.")
    int8_calibration_rows: int = _doc("int8: training rows of the version whose activations calibrate the smoothing.")
    int8_fallback_margin: float = _doc("int8: a text whose top-two probability margin is below this is recomputed in "
                                       "fp32 (token classification: its least certain word, at the sub-token the "
                                       "answer reads); 0 never recomputes.")
    max_texts: int = _doc("Most texts in one request (more: 413).")
    max_text_chars: int = _doc("Most characters in one text (more: 422).")
    max_body_bytes: int = _doc("Largest request body in bytes (more: 413).")
    threads: int = _doc("torch intra-op threads; 0 means the cores this process may use.")
    log_dir: str = _doc("Request log: a local folder or s3://bucket/prefix of Parquet files; empty disables it.")
    log_queue: int = _doc("Request log: predictions waiting to be written; a request whose predictions do not "
                          "fit is dropped from the log whole (and counted), never blocking it.")
    log_flush_seconds: float = _doc("Request log: write a new Parquet file at least this often while there is "
                                    "traffic.")
    log_file_rows: int = _doc("Request log: most predictions per Parquet file.")
    drain_seconds: float = _doc("On SIGTERM/SIGINT: how long in-flight requests may take to finish.")
    log_mask_pii: bool = _doc("Request log: mask PII in the texts (typed placeholders, kftune/pii.py) before they "
                              "are written; the model still sees the original text.")
    trust_client_time: bool = _doc("Record a request's X-Kftune-Time header (Unix seconds) as its time in the request "
                                   "log instead of the clock: for replaying traffic (make demo-loop), never for "
                                   "clients you do not control.")

    def problems(self) -> list[str]:
        out = [f"serve.{k}={getattr(self, k)!r}: must be > 0" for k in
               ("poll_seconds", "max_batch", "agreement_rows", "max_texts", "max_text_chars", "max_body_bytes",
                "log_queue", "log_flush_seconds", "log_file_rows", "drain_seconds") if getattr(self, k) <= 0]
        out += [f"serve.{k}={getattr(self, k)!r}: must be >= 0" for k in ("max_wait_ms", "max_queue", "threads",
                                                                        "int8_calibration_rows") if getattr(self, k) < 0]
        out += [f"serve.{k}={getattr(self, k)!r}: must be in [0, 1]" for k in ("int8_smoothing", "int8_fallback_margin")
                if not 0 <= getattr(self, k) <= 1]
        if self.precision not in SERVE_PRECISIONS:
            out.append(f"serve.precision={self.precision!r}: must be one of {', '.join(SERVE_PRECISIONS)}")
        if not 0 < self.min_agreement <= 1:
            out.append(f"serve.min_agreement={self.min_agreement!r}: must be in (0, 1]")
        if self.min_speedup < 1:
            out.append(f"serve.min_speedup={self.min_speedup!r}: must be >= 1")
        return out


ALERT_KINDS = {  # kind -> the keys a rule of that kind needs besides name, kind, window, min_requests
    "label_share": ("label", "max_share"), "label_shift": ("max_points",), "confidence": ("max_drop",),
    "volume": (), "drift": (), "live_quality": ("max_gap",)}
ALERT_SINKS = ("log", "webhook", "mlflow")
_WINDOW = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")


def window_seconds(text: str) -> float | None:
    """"90s", "30m", "1h", "2d" -> seconds (None if not such a duration)."""
    m = _WINDOW.fullmatch(str(text).strip())
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)] if m else None


@dataclass(frozen=True)
class AlertRule:
    """One parsed `monitor.rules` entry; a rule fails (fires) when its condition holds over its window."""

    name: str
    kind: str
    window: float  # seconds
    min_requests: int  # fewer predictions in the window: the rule cannot be judged and keeps its state
    label: str = ""
    max_share: float = 0.0
    max_points: float = 0.0
    max_drop: float = 0.0
    max_gap: float = 0.0
    for_checks: int = 1  # fire only after this many failing checks in a row (Prometheus' `for`)


def _text(value) -> str:
    """A rule's name or label as text: a whole number is the same text whether YAML gave an int or a cluster task's
    protobuf Struct (which keeps every number as a float) gave 1.0."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def parse_rules(rules: list[dict]) -> tuple[list[AlertRule], list[str]]:
    out, problems = [], []
    for i, r in enumerate(rules):
        key = f"monitor.rules[{i}]"
        kind = r.get("kind")
        if kind not in ALERT_KINDS:
            problems.append(f"{key}.kind={kind!r}: must be one of {', '.join(ALERT_KINDS)}")
            continue
        needed = ("name", "kind", "window", "min_requests", *ALERT_KINDS[kind])
        missing = [k for k in needed if k not in r]
        extra = sorted(set(r) - set(needed) - {"for_checks"})
        problems += [f"{key}.{k}: missing (a {kind} rule needs {', '.join(needed)})" for k in missing]
        problems += [f"{key}.{k}: unknown key for a {kind} rule (keys: {', '.join(needed)}, for_checks)"
                     for k in extra]
        for_checks = r.get("for_checks", 1)
        if isinstance(for_checks, bool) or not isinstance(for_checks, (int, float)) or not math.isfinite(for_checks) \
                or for_checks < 1 or for_checks != int(for_checks):
            problems.append(f"{key}.for_checks={for_checks!r}: must be a whole number >= 1")
            continue
        if missing or extra:
            continue
        seconds = window_seconds(r["window"])
        if seconds is None or seconds <= 0:
            problems.append(f"{key}.window={r['window']!r}: not a duration like 90s, 30m, 1h or 2d")
        bad = [k for k in ("min_requests", *ALERT_KINDS[kind]) if k != "label" and
               (isinstance(r[k], bool) or not isinstance(r[k], (int, float)) or not math.isfinite(r[k]) or r[k] < 0)]
        problems += [f"{key}.{k}={r[k]!r}: must be a number >= 0" for k in bad]
        if "min_requests" not in bad and r["min_requests"] != int(r["min_requests"]):
            bad.append("min_requests")
            problems.append(f"{key}.min_requests={r['min_requests']!r}: must be a whole number")
        if kind == "label_share" and not bad and not 0 < r["max_share"] < 1:
            problems.append(f"{key}.max_share={r['max_share']!r}: must be in (0, 1)")
        if seconds and not bad:
            out.append(AlertRule(_text(r["name"]), kind, seconds, int(r["min_requests"]),
                                 for_checks=int(for_checks),
                                 **{k: (_text(r[k]) if k == "label" else float(r[k])) for k in ALERT_KINDS[kind]}))
    names = [r.get("name") for r in rules]
    problems += [f"monitor.rules[{i}].name={n!r}: must be a non-empty text" for i, n in enumerate(names)
                 if not isinstance(n, (str, int, float)) or isinstance(n, bool) or not str(n).strip()]
    names = [_text(n) for n in names]  # 1 and "1" are the same alert
    problems += [f"monitor.rules: name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    return out, problems


@dataclass
class MonitorConfig:
    experiment: str = _doc("MLflow experiment where every `kftune monitor` check is one run (metrics over time, "
                           "report, alerts).")
    min_requests: int = _doc("Predictions of the champion since the last watermark needed before the drift tests "
                             "run on them; fewer wait for the next check.")
    rules: list[dict] = _doc("Alert rules, each {name, kind, window, min_requests, ...}: kind label_share (label, "
                             "max_share), label_shift (max_points), confidence (max_drop), volume, drift, "
                             "live_quality (max_gap); any rule may add for_checks: N (fire only after N failing "
                             "checks in a row). See README, Monitoring and feedback.")
    sinks: list[str] = _doc(f"Where an alert goes when it fires and when it resolves: {', '.join(ALERT_SINKS)}.")
    webhook_url: str = _doc(f"Webhook sink: URL that receives each alert as a JSON POST (empty: the environment's "
                            f"{WEBHOOK_ENV}, which a cluster's cluster.webhook_secret sets).")
    webhook_retries: int = _doc("Webhook sink: attempts after the first before an alert is logged as undelivered.")
    webhook_backoff_seconds: float = _doc("Webhook sink: wait before the first retry; doubled after each, up to 60 s "
                                          "(redirects are not followed).")
    webhook_timeout_seconds: float = _doc("Webhook sink: seconds one POST may take in all, connecting to last byte.")
    queue_random_share: float = _doc("`kftune label queue`: share drawn uniformly at random from the traffic, the "
                                     "only part that estimates live accuracy without bias.")
    queue_drift_share: float = _doc("`kftune label queue`: share drawn from the region the drift tests point at "
                                    "(texts with the most words unseen in the champion's training data); the rest "
                                    "are the least confident predictions.")
    queue_seed: int = _doc("Seed of the labelling queue's random sample.")
    confidence_level: float = _doc("Confidence level of the live accuracy and macro-F1 intervals.")
    history: int = _doc("Checks kept in the monitor's state file for the report's time series.")
    log_retention_days: int = _doc("Each check deletes the request log's day folders older than this many days "
                                   "(0: keep every day; no shorter than the longest rule window). Days 2 or more "
                                   "days old are compacted into one file either way.")

    def parsed_rules(self) -> list[AlertRule]:
        return parse_rules(self.rules)[0]

    def webhook_target(self) -> str:
        """The webhook URL: monitor.webhook_url, else the environment's KFTUNE_WEBHOOK_URL ('' if neither)."""
        import os

        return self.webhook_url or os.environ.get(WEBHOOK_ENV, "").strip()

    def check_webhook(self) -> None:
        """Where alerts are sent (not at load: a cluster task without the Secret reads these params too): the
        webhook sink needs an http(s) URL from monitor.webhook_url or KFTUNE_WEBHOOK_URL."""
        if "webhook" in self.sinks and not self.webhook_target().startswith(("http://", "https://")):
            where = "is not an http(s) URL" if self.webhook_target() else "is not set"
            raise ConfigError(f"monitor.sinks has webhook, but monitor.webhook_url is empty and {WEBHOOK_ENV} {where} "
                              f"(on a cluster: the key {WEBHOOK_ENV} of the Secret cluster.webhook_secret)")

    def problems(self) -> list[str]:
        rules, out = parse_rules(self.rules)
        longest = max((r.window for r in rules), default=0)
        if 0 < self.log_retention_days * 86400 < longest:
            out.append(f"monitor.log_retention_days={self.log_retention_days}: shorter than the longest rule window "
                       f"({longest / 86400:g} days), which would judge part of its window")
        out += [f"monitor.sinks: unknown sink {s!r} (known: {', '.join(ALERT_SINKS)})" for s in self.sinks
                if s not in ALERT_SINKS]
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            out.append("monitor.webhook_url: not an http(s) URL (the value is a credential: not shown)")
        out += [f"monitor.{k}={getattr(self, k)!r}: must be > 0" for k in
                ("min_requests", "webhook_timeout_seconds", "history") if getattr(self, k) <= 0]
        out += [f"monitor.{k}={getattr(self, k)!r}: must be >= 0" for k in ("webhook_retries", "webhook_backoff_seconds",
                                                                           "log_retention_days")
                if getattr(self, k) < 0]
        for k in ("queue_random_share", "queue_drift_share"):
            if not 0 <= getattr(self, k) <= 1:
                out.append(f"monitor.{k}={getattr(self, k)!r}: must be in [0, 1]")
        if self.queue_random_share + self.queue_drift_share > 1:
            out.append(f"monitor.queue_random_share + monitor.queue_drift_share = "
                       f"{self.queue_random_share + self.queue_drift_share:g}: must be <= 1")
        if not 0.5 <= self.confidence_level < 1:
            out.append(f"monitor.confidence_level={self.confidence_level!r}: must be in [0.5, 1)")
        if not self.experiment.strip():
            out.append("monitor.experiment is empty")
        return out + _seed_problem("monitor.queue_seed", self.queue_seed)


@dataclass
class Params:
    task: str = _doc("sequence-classification (one label per text) or token-classification (one IOB2 tag per word).")
    model: ModelConfig = _doc("Base model.")
    ingest: IngestConfig = _doc("Reading, cleaning and splitting the data.")
    tokenize: TokenizeConfig = _doc("Tokenization.")
    finetune: FinetuneConfig = _doc("Training loop.")
    evaluate: EvaluateConfig = _doc("Test metrics and baselines.")
    register: RegisterConfig = _doc("MLflow registry and promotion gate.")
    drift: DriftConfig = _doc("Drift tests of the retraining pipeline.")
    retrain: RetrainConfig = _doc("When and how the retraining pipeline trains a challenger.")
    cluster: ClusterConfig = _doc("Settings that only apply when the pipeline is compiled for a cluster.")
    serve: ServeConfig = _doc("`kftune serve` and `kftune predict`: batching, precision, limits, request log.")
    monitor: MonitorConfig = _doc("`kftune monitor`, alerts, feedback and the labelling queue.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short stable hash of every setting, tagged on model versions; the same after a trip through KFP,
        which turns every integer inside a dict parameter (monitor.rules) into a float."""
        doc = self.to_dict()
        for key in SECRET_PARAMS:  # where alerts go is no setting of the model
            section, name = key.split(".")
            doc[section][name] = ""
        blob = json.dumps(_integral(doc), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _integral(value):
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


_BAD = object()


def _coerce(value, tp, key: str, problems: list[str]):
    """Check `value` against the annotation `tp` (ints pass as floats); return _BAD if it does not fit."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", problems)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            problems.append(f"{key}={value!r}: expected a list")
            return _BAD
        items = [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if _BAD in items else items
    if tp is float and not isinstance(value, bool):
        try:
            number = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            pass
        else:
            if math.isfinite(number):
                return number
            problems.append(f"{key}={value!r}: expected a finite number")  # NaN passes every < or > check
            return _BAD
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # KFP passes dict parameters as protobuf Structs, where every number is a float
    if tp is bool and isinstance(value, str) and value.lower() in YAML11_SWITCHES:
        return YAML11_SWITCHES[value.lower()]
    if tp is str and isinstance(value, bool):
        return str(value).lower()  # bf16: true / false / auto
    if tp is str and isinstance(value, (int, float)):
        return str(value)  # YAML reads a label like `1` as int; labels are strings
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{key}={value!r}: expected {tp.__name__}, got {type(value).__name__}")
        return _BAD
    return value


_STAND_INS = {int: 1, float: 1.0, str: "", bool: False}


def _other_problems(cls, kwargs: dict, bad: list[str], hints: dict, prefix: str) -> list[str]:
    """The section's own checks on its keys that are not `bad` (missing or of the wrong type): each bad key
    stands in as a value of its type, and what the checks say about it is dropped. So one wrong type does not
    hide the section's other problems until it is fixed. Nothing where a bad key is a whole section."""
    if not hasattr(cls, "problems") or any(dataclasses.is_dataclass(hints[n]) for n in bad):
        return []
    stand_ins = {n: [] if typing.get_origin(hints[n]) is list else _STAND_INS[hints[n]] for n in bad}
    try:
        found = cls(**{**kwargs, **stand_ins}).problems()
    except Exception:  # noqa: BLE001 - a check that cannot run on a stand-in: the bad key is reported anyway
        return []
    about_bad = re.compile("|".join(rf"(?<![\w.]){re.escape(prefix + n)}(?!\w)" for n in bad))
    return [p for p in found if not about_bad.search(p)]


def _build(cls, data, prefix: str, problems: list[str]):
    """Build dataclass `cls` from a mapping; sections that build run their own semantic checks."""
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {type(data).__name__}")
        return _BAD
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for extra in sorted(set(data) - set(names)):
        problems.append(f"{prefix}{extra}: unknown key (known: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            problems.append(f"{prefix}{name}: missing")
            kwargs[name] = _BAD
        else:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}", problems)
    if bad := [name for name in names if kwargs[name] is _BAD]:
        problems += _other_problems(cls, kwargs, bad, hints, prefix)
        return _BAD
    obj = cls(**kwargs)
    if hasattr(obj, "problems"):
        problems += obj.problems()
    return obj


class _Yaml12(yaml.SafeLoader):
    """YAML as YAML 1.2 reads plain scalars: only true/false are booleans and `010` is text, not the octal 8
    (YAML 1.1 turned `labels: [no, yes]` into [false, true] and a split_salt of 010 into 8)."""


_BOOL, _INT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int"
# YAML 1.1's other booleans: text under YAML 1.2, still taken as such where a setting is a switch
YAML11_SWITCHES = {"yes": True, "on": True, "no": False, "off": False}
_Yaml12.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT)]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$|^[-+]?0x[0-9a-fA-F_]+$"),
                              list("-+0123456789"))


def _mapping_without_repeats(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                f"while reading the mapping that starts at line {node.start_mark.line + 1}", node.start_mark,
                f"{key!r} is given twice (line {seen[key] + 1} and line {key_node.start_mark.line + 1}): one wins "
                f"silently", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Yaml12.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        lambda loader, node: _mapping_without_repeats(loader, node))


def read_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12)  # noqa: S506 - a SafeLoader with YAML 1.2's plain scalars


def _apply_override(data: dict, assignment: str, problems: list[str]) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        problems.append(f"override {assignment!r}: expected KEY=VALUE, e.g. finetune.learning_rate=3e-5")
        return
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            problems.append(f"override {key}: {part!r} is not a section of params.yaml")
            return
        node = node[part]
    if leaf not in node:
        problems.append(f"override {key}: unknown key")
        return
    try:
        node[leaf] = read_yaml(raw) if raw else ""
    except yaml.YAMLError as exc:
        problems.append(f"override {key}={raw!r}: not a YAML value ({str(exc).splitlines()[0]}); quote text, "
                        f"e.g. -S '{key}=[a, b]'")


def params_from_dict(data: dict, overrides: list[str] = (), source: str = "params") -> Params:
    """Build and validate Params; raise ConfigError listing every problem at once."""
    data = json.loads(json.dumps(data))  # deep copy; overrides must not leak into the caller's dict
    problems: list[str] = []
    for assignment in overrides:
        _apply_override(data, assignment, problems)
    _build(Params, data, "", problems)
    if data.get("task") not in TASKS:
        problems.append(f"task={data.get('task')!r}: must be one of {', '.join(TASKS)}")
    methods = (data.get("drift") or {}).get("methods")
    if data.get("task") == "sequence-classification" and isinstance(methods, list) and methods == ["entities"]:
        problems.append("drift.methods=['entities']: entities runs for token-classification only; a classifier's "
                        "drift could never be declared")
    if problems:
        raise ConfigError(f"invalid settings in {source}:\n  - " + "\n  - ".join(problems))
    return _build(Params, data, "", [])


def load_params(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project folder or pass --params)")
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (finetune:, ingest:, ...), got a "
                          f"{type(data).__name__}")
    return params_from_dict(data or {}, overrides, source=str(path))


def params_help() -> dict[str, str]:
    """key path -> help text, for the README and `kftune params`."""
    out = {}

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = f.metadata["help"]
    walk(Params, "")
    return out

