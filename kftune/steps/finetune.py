"""fine-tune: the training loop, for sequence and token classification, and its torchrun launcher.

A plain PyTorch loop rather than HF Trainer: on CPU its length-grouped sampler sorts each
mega-batch long-to-short without shuffling, which cost most of the accuracy here. Ours groups
by length *and* shuffles the batches, pads each batch only to its own longest text, and
checkpoints at optimizer-step boundaries so a killed run resumes exactly where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from kftune.config import FinetuneConfig, KftuneError
from kftune.fileio import atomic_dir, read_json, write_json
from kftune.predict import MODEL_INFO, pad_batch, predict_logits

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
CHECKPOINT = "checkpoint.pt"
# finetune.epochs: 0. Taggers get more: on WNUT-17 every run's validation entity F1 still rose after epoch 3
# (kftune and the hand-written loop alike); 5 epochs took the hand-written loop's 3-epoch time (benchmarks/recipes.py)
AUTO_EPOCHS = {"sequence-classification": 3, "token-classification": 5}


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list:
    """Index batches for one epoch, a pure function of (seed, epoch) so a resumed run sees the same order.

    With grouping, each random mega-batch of 50 batches is sorted by length and cut into batches,
    then the batch order is shuffled: little padding, but no long-to-short curriculum.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    mega = batch_size * 50
    batches = []
    for start in range(0, len(perm), mega):
        chunk = perm[start : start + mega]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _freeze(model, cfg: FinetuneConfig) -> None:
    if not (cfg.freeze_embeddings or cfg.freeze_layers):
        return
    base = getattr(model, model.base_model_prefix)
    if not hasattr(base, "embeddings") or not hasattr(getattr(base, "encoder", None), "layer"):
        raise ValueError(f"finetune.freeze_*: freezing needs a BERT-style encoder, not {type(base).__name__}")
    if cfg.freeze_embeddings:
        base.embeddings.requires_grad_(False)
    layers = base.encoder.layer
    if cfg.freeze_layers > len(layers):
        raise ValueError(f"finetune.freeze_layers={cfg.freeze_layers}: the model has only {len(layers)} layers")
    for layer in layers[: cfg.freeze_layers]:
        layer.requires_grad_(False)


def _optimizer(model, cfg: FinetuneConfig):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)  # biases and LayerNorm weights
    # the fused kernel: on CPU torch's default is a per-tensor loop, 3-10x slower for MiniLM's 22M parameters
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.peak_learning_rate, fused=fused)


def _read_split(tokenized_dir: Path, split: str, ner: bool):
    """(input ids, labels, words): labels one int per text, or (NER) one array per window with, per window, its
    word ids and the sentence it is part of."""
    df = pd.read_parquet(tokenized_dir / f"{split}.parquet")
    if ner:
        return ([list(x) for x in df["input_ids"]], [np.array(y) for y in df["labels"]],
                list(zip(df["word_ids"], df["sentence"], df["first_word"])))
    return [list(x) for x in df["input_ids"]], df["label"].to_numpy(copy=True), None


def _batch_labels(y, idx, width: int, ner: bool):
    """Labels of one batch; NER label rows are padded with IGNORE like the input ids are with [PAD]."""
    import torch

    from kftune.ner import IGNORE

    if not ner:
        return torch.as_tensor(y[idx])
    out = torch.full((len(idx), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(idx):
        out[row, : len(y[i])] = torch.as_tensor(y[i])
    return out


COLLAPSE_MIN_ROWS = 5  # a label with this many validation rows that is never predicted: a collapsed run


def validation_metrics(model, x, y, word_ids, pad_id: int, labels: list[str], batch_size: int, bf16: bool) -> dict:
    """Validation loss and score: macro-F1 for texts, entity F1 (seqeval) for tags on each word's first sub-token,
    per sentence as evaluate scores it (word_ids: per window, its word ids, sentence and first word)."""
    import torch

    from kftune.metrics import entity_metrics, macro_f1
    from kftune.ner import IGNORE, repaired
    from kftune.predict import predict_token_logits

    if word_ids is None:
        logits = predict_logits(model, x, pad_id, batch_size, bf16)
        loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
        pred = logits.argmax(1)
        support = np.bincount(y, minlength=len(labels))
        missing = int(((support >= COLLAPSE_MIN_ROWS) & (np.bincount(pred, minlength=len(labels)) == 0)).sum())
        return {"val_macro_f1": macro_f1(y, pred, len(labels)), "val_accuracy": float((pred == y).mean()),
                "val_loss": loss, "val_labels_never_predicted": missing}
    logits = predict_token_logits(model, x, pad_id, batch_size, bf16)
    flat_logits = np.concatenate([lg[yy != IGNORE] for lg, yy in zip(logits, y)])
    flat_y = np.concatenate([yy[yy != IGNORE] for yy in y])
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(flat_logits), torch.from_numpy(flat_y)))
    sentences: dict[int, list] = {}  # sentence -> its windows' (first word, gold tags, predicted tags)
    for lg, yy, (ww, sentence, first_word) in zip(logits, y, word_ids):
        first = [i for i, w in enumerate(ww) if w >= 0 and (i == 0 or ww[i - 1] != w)]
        sentences.setdefault(sentence, []).append((first_word, [labels[yy[i]] for i in first],
                                                   [labels[int(lg[i].argmax())] for i in first]))
    # windows joined back into sentences: an entity across a window boundary is one entity, as in evaluate
    joined = [sorted(windows, key=lambda w: w[0]) for windows in sentences.values()]
    gold = [repaired([t for w in windows for t in w[1]]) for windows in joined]
    pred = [repaired([t for w in windows for t in w[2]]) for windows in joined]
    m = entity_metrics(gold, pred)
    return {"val_entity_f1": m["entity_f1"], "val_token_accuracy": m["token_accuracy"], "val_loss": loss}


def tokenized_digest(tokenized_dir: str | Path) -> str:
    """SHA-256 of the tokenized train and validation splits: what a checkpoint was trained on."""
    return hashlib.sha256(b"".join((Path(tokenized_dir) / f"{s}.parquet").read_bytes()
                                   for s in ("train", "validation"))).hexdigest()


@dataclass
class Job:
    """Everything one training run holds: data, model, optimizer, and where it reports."""

    cfg: FinetuneConfig
    labels: list[str]
    ner: bool
    train: tuple
    val: tuple
    tokenizer: object
    model: object
    train_model: object  # the model, or its DDP wrapper
    optimizer: object
    scheduler: object
    device: object
    bf16: bool
    total_steps: int
    eval_every: int
    hardware: dict
    world: int = 1
    rank: int = 0
    on_log: LogFn = lambda metrics, step: None
    state: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "group": 0, "best_f1": -1.0, "best_step": 0,
                                                 "bad_evals": 0, "history": []})
    best_weights: dict | None = None

    @functools.cached_property
    def train_lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.train[0]])

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def score_key(self) -> str:
        return "val_entity_f1" if self.ner else "val_macro_f1"


def planned_epochs(cfg: FinetuneConfig, stats: dict) -> int:
    """finetune.epochs, or for 0 the task's default (AUTO_EPOCHS)."""
    return cfg.epochs or AUTO_EPOCHS[stats.get("task", "sequence-classification")]


def _build(tokenized_dir: Path, stats: dict, model_name: str, cfg: FinetuneConfig, on_log: LogFn | None) -> Job:
    """Read the splits, load the base model, wrap it for DDP under torchrun, make optimizer and schedule."""
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              get_linear_schedule_with_warmup, set_seed)

    from kftune.base_models import load_pretrained, resolve_base_model
    from kftune.hardware import bound_kernel_caches, setup

    labels, ner = stats["labels"], stats.get("task") == "token-classification"
    bound_kernel_caches()
    hw = setup(cfg.bf16, cfg.threads)
    set_seed(cfg.seed)
    train, val = _read_split(tokenized_dir, "train", ner), _read_split(tokenized_dir, "validation", ner)
    if not ner and len(np.unique(val[1])) < 2:
        log.warning("fine-tune: every validation row has the label %r: checkpoints chosen by macro-F1 there favour "
                    "predicting it everywhere; give the validation split rows of other labels (a larger "
                    "ingest.validation_fraction, or a split column)", labels[int(val[1][0])] if len(val[1]) else None)
    model = load_pretrained(AutoModelForTokenClassification if ner else AutoModelForSequenceClassification,
                            resolve_base_model(model_name), num_labels=len(labels), id2label=dict(enumerate(labels)),
                            label2id={lbl: i for i, lbl in enumerate(labels)})
    _freeze(model, cfg)
    if cfg.method == "lora":
        from kftune.lora import wrap

        model = wrap(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, ner)
    # Under torchrun there is one process per GPU (or per CPU worker, with gloo); each trains on
    # its share of every epoch's batches and DDP averages the gradients. Alone, one GPU if present.
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    model.to(device)
    train_model = model
    if cuda:
        torch.cuda.set_device(device)  # NCCL's collectives use the current device
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        torch.manual_seed(cfg.seed + rank)  # the same weights everywhere (DDP broadcasts them), other dropout
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(math.ceil(len(train[0]) / cfg.batch_size) // world / cfg.grad_accum_steps)
    if not steps_per_epoch:
        raise KftuneError(f"{len(train[0])} training rows make fewer batches of finetune.batch_size="
                          f"{cfg.batch_size} than the {world} processes training: lower the batch size or use "
                          f"fewer processes")
    total_steps = cfg.max_steps or planned_epochs(cfg, stats) * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    job = Job(cfg, labels, ner, train, val, AutoTokenizer.from_pretrained(tokenized_dir / "tokenizer"), model,
              train_model, optimizer, scheduler, device, hw["precision"] == "bf16", total_steps,
              cfg.eval_every_steps or steps_per_epoch, hw, world, rank)
    if on_log and rank == 0:  # rank 0 reports for everyone
        job.on_log = on_log
    return job


def _fingerprint(tokenized_dir: Path, model_name: str, job: Job) -> dict:
    """What a checkpoint must match to be resumed: start weights, settings, data and labels."""
    exported = Path(model_name) / MODEL_INFO  # a champion exported by resolve: a new folder in every pipeline run
    version = read_json(exported).get("version") if exported.exists() else None
    return {"model": f"registry version {version}" if version else model_name, "cfg": vars(job.cfg),
            "data": tokenized_digest(tokenized_dir), "labels": job.labels, "processes": job.world}


def _resume(job: Job, ckpt_path: Path | None, fingerprint: dict) -> int:
    """Load a matching checkpoint (tensors and plain data only: weights_only); return the step it resumes at."""
    import torch

    if not (ckpt_path and ckpt_path.exists()):
        return 0
    try:
        ckpt = torch.load(ckpt_path, weights_only=True, map_location=job.device)
    except FileNotFoundError:
        return 0  # set aside by rank 0 (below) while this rank was about to read it
    except (OSError, torch.cuda.OutOfMemoryError):
        raise  # the disk or the device, not the file: the task's retry may succeed
    except Exception as exc:  # noqa: BLE001 - damaged (a node lost power mid-write): start over, keep the file
        damaged = ckpt_path.with_name(ckpt_path.name + ".damaged")
        if job.rank == 0:  # under torchrun every rank reads it and fails the same way; one sets it aside
            with contextlib.suppress(FileNotFoundError):
                os.replace(ckpt_path, damaged)
        log.warning("fine-tune: %s cannot be read (%s: %s); set aside as %s, training from the start", ckpt_path,
                    type(exc).__name__, str(exc)[:200], damaged.name)
        return 0
    if ckpt["fingerprint"] != json.loads(json.dumps(fingerprint)):
        log.warning("fine-tune: ignoring %s, it was made with other data or settings", ckpt_path)
        return 0
    job.model.load_state_dict(ckpt["model"])
    job.optimizer.load_state_dict(ckpt["optimizer"])
    job.scheduler.load_state_dict(ckpt["scheduler"])
    job.state, job.best_weights = ckpt["state"], ckpt["best_weights"]
    _reseed(job)  # as the interrupted run did at this step
    log.info("fine-tune: resuming from %s at step %d", ckpt_path, job.state["step"])
    return job.state["step"]


def _reseed(job: Job) -> None:
    """Seed this process's generators (CPU and CUDA: dropout) from (seed, rank, step). Done at every checkpoint
    boundary, checkpointing or not, and on resuming from one, so a resumed run draws what the interrupted one
    would have drawn, in every process, with no random state saved and no collective to gather them."""
    import hashlib

    import torch

    key = hashlib.sha256(f"{job.cfg.seed}:{job.rank}:{job.state['step']}".encode()).digest()
    torch.manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def _save_checkpoint(job: Job, ckpt_path: Path, fingerprint: dict) -> None:
    import torch

    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save({"fingerprint": json.loads(json.dumps(fingerprint)), "model": job.model.state_dict(),
                    "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict(),
                    "state": job.state, "best_weights": job.best_weights}, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a power loss leaves the old checkpoint, not an empty one
    os.replace(tmp, ckpt_path)


def _validate(job: Job) -> bool:
    """Record a validation, keep the best weights; return True when patience has run out."""
    x, y, words = job.val
    metrics = validation_metrics(job.model, x, y, words, job.pad_id, job.labels, job.cfg.batch_size * 2, job.bf16)
    state, f1 = job.state, metrics[job.score_key]
    state["history"].append({"step": state["step"], **metrics})
    job.on_log(metrics, state["step"])
    log.info("fine-tune step %d: %s %.4f, loss %.4f", state["step"], job.score_key, f1, metrics["val_loss"])
    if f1 > state["best_f1"]:
        state.update(best_f1=f1, best_step=state["step"], bad_evals=0)
        job.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in job.model.state_dict().items()}
    else:
        state["bad_evals"] += 1
    job.model.train()
    return _patience_out(job)


def _patience_out(job: Job) -> bool:
    return bool(job.cfg.early_stopping_patience) and job.state["bad_evals"] >= job.cfg.early_stopping_patience


def _groups(job: Job) -> list[list]:
    """This epoch's batches for this process, cut into groups of grad_accum_steps (the last may be shorter)."""
    batches = epoch_batches(job.train_lengths, job.cfg.batch_size, job.cfg.seed, job.state["epoch"],
                            job.cfg.group_by_length)
    batches = batches[: len(batches) // job.world * job.world][job.rank :: job.world]  # every process the same count
    k = job.cfg.grad_accum_steps
    return [batches[i : i + k] for i in range(0, len(batches), k)]


def micro_batches(idx, lengths, token_budget: int) -> list:
    """A batch cut into parts of at most `token_budget` padded tokens (0: no limit), shortest texts first so each
    part pads less; a single text longer than the budget is its own part."""
    width = max(lengths[i] for i in idx)
    if not token_budget or len(idx) * width <= token_budget:
        return [idx]
    idx = sorted(idx, key=lambda i: lengths[i])
    parts, part = [], []
    for i in idx:  # sorted, so the part's widest text is the one being added
        if part and (len(part) + 1) * lengths[i] > token_budget:
            parts.append(part)
            part = []
        part.append(i)
    return parts + [part]


def _train_step(job: Job, group: list) -> float:
    """One optimizer step over a group of batches (gradient accumulation); returns the mean loss per labelled row.

    A batch over finetune.micro_batch_tokens runs in parts. Each pass's mean loss is weighted by its share of
    the step's labelled rows (tokens, for tagging), over every batch of the group and, under DDP, every process:
    the gradient of one pass over all of them, whatever the batches' sizes (an epoch's short last batch, a
    batch of long sentences, counts no more per row than the others). Under DDP only the step's last backward
    pass synchronises: processes may cut their batches into different numbers of parts, and every process must
    all-reduce the same number of times."""
    import torch

    from kftune.ner import IGNORE

    x, y, _ = job.train
    passes = []
    for idx in group:
        for part in micro_batches(idx, job.train_lengths, job.cfg.micro_batch_tokens):
            ids, mask = pad_batch([x[i] for i in part], job.pad_id)
            labels = _batch_labels(y, part, ids.shape[1], job.ner)
            passes.append((ids, mask, labels, int((labels != IGNORE).sum())))
    labelled = sum(p[3] for p in passes)
    everywhere = torch.tensor([float(labelled)], device=job.device)
    if job.world > 1:  # DDP averages the processes' gradients: weigh by the labelled rows of all of them
        torch.distributed.all_reduce(everywhere)
    scale = job.world / max(float(everywhere.item()), 1.0)
    total = 0.0
    for k, (ids, mask, labels, n) in enumerate(passes):
        last = k == len(passes) - 1
        with contextlib.nullcontext() if job.world == 1 or last else job.train_model.no_sync():
            with torch.autocast(job.device.type, dtype=torch.bfloat16, enabled=job.bf16):
                loss = job.train_model(input_ids=ids.to(job.device), attention_mask=mask.to(job.device),
                                       labels=labels.to(job.device)).loss
            (loss * (n * scale)).backward()
        total += loss.item() * n
    if job.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(job.model.parameters(), job.cfg.max_grad_norm)
    job.optimizer.step()
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)
    return total / max(labelled, 1)


def _report(job: Job, losses: list[float], rate: float, started: float, resumed_from: int) -> None:
    step, total = job.state["step"], job.total_steps
    metrics = {"train_loss": float(np.mean(losses)), "learning_rate": job.scheduler.get_last_lr()[0],
               "examples_per_second": rate}
    job.state["history"].append({"step": step, **metrics})
    job.on_log(metrics, step)
    elapsed = time.monotonic() - started
    eta = elapsed / max(step - resumed_from, 1) * (total - step)
    log.info("fine-tune step %d/%d: loss %.4f, %.1f examples/s, %s elapsed, ETA %s", step, total,
             metrics["train_loss"], rate, _clock(elapsed), _clock(eta))


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _train(job: Job, ckpt_path: Path | None, fingerprint: dict, resumed_from: int) -> dict:
    """The training loop of one run (from its resumed step); returns examples seen, seconds and the early stop."""
    from tqdm.auto import tqdm

    cfg, state, started = job.cfg, job.state, time.monotonic()
    seen, train_seconds, losses = 0, 0.0, []
    stopped_early = _patience_out(job)
    bar = tqdm(total=job.total_steps, initial=state["step"], desc="fine-tune", unit="step", mininterval=2,
               disable=None if job.rank == 0 else True)
    job.model.train()
    while state["step"] < job.total_steps and not stopped_early:
        groups = _groups(job)
        for group in groups[state["group"] :]:
            t0 = time.perf_counter()
            losses.append(_train_step(job, group))
            train_seconds += time.perf_counter() - t0
            seen += sum(len(b) for b in group) * job.world
            state["step"] += 1
            state["group"] += 1
            if state["group"] == len(groups):
                state.update(epoch=state["epoch"] + 1, group=0)
            rate = seen / max(train_seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", ex_s=f"{rate:.1f}")
            if state["step"] % cfg.log_every_steps == 0:
                _report(job, losses, rate, started, resumed_from)
                losses = []
            if state["step"] % job.eval_every == 0 or state["step"] >= job.total_steps:
                stopped_early = _validate(job) or stopped_early
            if cfg.checkpoint_every_steps and state["step"] % cfg.checkpoint_every_steps == 0:
                _reseed(job)  # checkpointing or not: the same draws either way
                if ckpt_path and job.rank == 0:
                    _save_checkpoint(job, ckpt_path, fingerprint)
            if stopped_early or state["step"] >= job.total_steps:
                break
    bar.close()
    return {"seen": seen, "train_seconds": train_seconds,
            "stopped_early": stopped_early and state["step"] < job.total_steps}


def _shelve(job: Job) -> None:
    """Keep a finished run only as far as saving it needs: its best weights in the model, no optimizer state
    (twice the model's size) and no second copy, so the next run trains in the memory this one held."""
    import gc

    job.model.load_state_dict(job.best_weights)
    job.best_weights = job.model.state_dict()
    job.optimizer = job.scheduler = job.train_model = None
    gc.collect()


def _labels_never_predicted(job: Job) -> int:
    """How many labels (with >= COLLAPSE_MIN_ROWS validation rows) the best validation never predicted."""
    best = [h for h in job.state["history"] if h["step"] == job.state["best_step"] and job.score_key in h]
    return int(best[-1].get("val_labels_never_predicted", 0)) if best else 0


def finetune(tokenized_dir: str | Path, out_dir: str | Path, model_name: str, cfg: FinetuneConfig,
             checkpoint_dir: str | Path | None = None, on_log: LogFn | None = None) -> dict:
    """Fine-tune the base model on the tokenized train split, early-stopping on validation macro-F1 (entity F1).

    Args:
        tokenized_dir: tokenize output ({split}.parquet, tokenizer/, tokenize_stats.json).
        out_dir: where the fine-tuned model, its tokenizer, kftune.json and training_history.json go.
        model_name: base model (see kftune.base_models), or a folder of weights to start from.
        cfg: the `finetune` section of params.yaml.
        checkpoint_dir: where resumable checkpoints live; a checkpoint found there is resumed.
        on_log: called with (metrics, step) every log_every_steps and after every validation.

    Returns:
        A summary: steps, epochs, best validation score, examples/s, precision and threads chosen, resume.
    """
    tokenized_dir = Path(tokenized_dir)
    stats = read_json(tokenized_dir / "tokenize_stats.json")
    job = _build(tokenized_dir, stats, model_name, cfg, on_log)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    fingerprint = _fingerprint(tokenized_dir, model_name, job)
    resumed_from = _resume(job, ckpt_path, fingerprint)
    run = _train(job, ckpt_path, fingerprint, resumed_from)
    last, last_seconds, tries, offset, resumed_kept = job, run["train_seconds"], [], job.total_steps, True
    while job.world == 1 and len(tries) < cfg.restarts and (missing := _labels_never_predicted(last)):
        tries.append({"seed": last.cfg.seed, f"best_{last.score_key}": last.state["best_f1"],
                      "labels_never_predicted": missing, "train_seconds": last_seconds})
        seed = cfg.seed + len(tries)
        log.warning("fine-tune: a collapsed run: its best validation (%s %.4f) never predicts %d label(s) with "
                    ">= %d validation rows; training again from seed %d (finetune.restarts=%d), the better run is "
                    "kept", last.score_key, last.state["best_f1"], missing, COLLAPSE_MIN_ROWS, seed, cfg.restarts)
        shifted = (lambda m, s, o=offset: on_log(m, s + o)) if on_log else None  # MLflow's steps go on
        _shelve(last)  # the best run so far is kept for saving; a beaten one not at all
        last = None
        last = _build(tokenized_dir, stats, model_name, dataclasses.replace(cfg, seed=seed), shifted)
        more = _train(last, None, fingerprint, 0)
        offset, last_seconds = offset + last.total_steps, more["train_seconds"]
        if last.state["best_f1"] > job.state["best_f1"]:
            job, run["stopped_early"], resumed_kept = last, more["stopped_early"], False
        run.update(seen=run["seen"] + more["seen"], train_seconds=run["train_seconds"] + more["train_seconds"])
    state = job.state
    summary = {"steps": state["step"], "epochs_completed": state["epoch"],
               "epochs_planned": 0 if cfg.max_steps else planned_epochs(cfg, stats),
               "total_steps_planned": job.total_steps,
               f"best_{job.score_key}": state["best_f1"], "best_step": state["best_step"],
               "stopped_early": run["stopped_early"], "resumed_from_step": resumed_from if resumed_kept else 0,
               "learning_rate": cfg.peak_learning_rate, "method": cfg.method, "seed": job.cfg.seed,
               "collapsed_runs": tries,
               "trainable_parameters": sum(p.numel() for p in job.model.parameters() if p.requires_grad),
               "train_examples": len(job.train[0]),
               "examples_per_second": run["seen"] / max(run["train_seconds"], 1e-9),
               "train_seconds": run["train_seconds"], "processes": job.world, **job.hardware}
    if job.world > 1:
        import torch

        torch.distributed.destroy_process_group()
        if job.rank:
            return summary  # rank 0 writes the model
    _save_model(job, out_dir, stats, model_name, summary)
    if ckpt_path and ckpt_path.exists():
        ckpt_path.unlink()  # finished: a later run with the same key must start fresh
        with contextlib.suppress(OSError):  # and its folder, when nothing else is in it
            ckpt_path.parent.rmdir()
    log.info("fine-tune: %d steps, best %s %.4f at step %d, %.1f examples/s, %s, %d threads", state["step"],
             job.score_key, state["best_f1"], state["best_step"], summary["examples_per_second"],
             summary["precision"], summary["threads"])
    return summary


def _save_model(job: Job, out_dir: str | Path, stats: dict, model_name: str, summary: dict) -> None:
    """Write the best validation weights, the tokenizer (truncating as in training) and the records.

    LoRA: the adapter goes to adapter/ (what register logs) and the merged model beside it (what every
    other step loads).
    """
    from kftune.lora import ADAPTER, is_peft

    job.model.load_state_dict(job.best_weights)
    with atomic_dir(out_dir) as tmp:
        model = job.model
        if is_peft(model):
            model.save_pretrained(tmp / ADAPTER)
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        job.tokenizer.model_max_length = stats["max_length"]  # so every later user truncates as training did
        job.tokenizer.save_pretrained(tmp)
        write_json(tmp / MODEL_INFO, {"labels": job.labels, "max_length": stats["max_length"],
                                      "base_model": model_name, "task": stats.get("task", "sequence-classification"),
                                      "method": job.cfg.method})
        write_json(tmp / "training_history.json", job.state["history"])
        write_json(tmp / "train_summary.json", summary)


def write_plots(history_file: str | Path, folder: str | Path) -> None:
    """DVC plots: one file per curve (train_loss, the validation score), one record per step."""
    history = read_json(history_file)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for key in [k for k in ("train_loss", "val_macro_f1", "val_entity_f1") if any(k in h for h in history)]:
        write_json(Path(folder) / f"{key}.json", [{"step": h["step"], key: h[key]} for h in history if key in h])


class DistributedFailed(KftuneError):
    pass


def launch(tokenized_dir: str, out_dir: str, model_name: str, cfg: FinetuneConfig, processes: int,
           run_id: str = "", checkpoint_dir: str | None = None) -> None:
    """Run `finetune` under torchrun: one process per GPU (gloo workers on a CPU-only host).

    Each worker runs this module's main(); rank 0 logs to the MLflow run `run_id` and writes the model.
    """
    import subprocess

    if subprocess.run(torchrun_command(tokenized_dir, out_dir, model_name, cfg, processes, run_id,
                                       checkpoint_dir)).returncode:
        raise DistributedFailed(f"distributed fine-tune ({processes} processes) failed; see its log above")


def torchrun_command(tokenized_dir: str, out_dir: str, model_name: str, cfg: FinetuneConfig, processes: int,
                     run_id: str = "", checkpoint_dir: str | None = None) -> list[str]:
    """The command `launch` runs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "kftune.steps.finetune", "--tokenized", str(tokenized_dir), "--out", str(out_dir),
           "--model", model_name, "--config", json.dumps(vars(cfg))]
    cmd += ["--mlflow-run-id", run_id] if run_id else []
    return cmd + (["--checkpoint-dir", str(checkpoint_dir)] if checkpoint_dir else [])


def main(argv: list[str] | None = None) -> None:
    """One torchrun worker (see `launch`)."""
    ap = argparse.ArgumentParser(prog="python -m kftune.steps.finetune")
    ap.add_argument("--tokenized", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True, help="the finetune section as JSON")
    ap.add_argument("--mlflow-run-id", default="")
    ap.add_argument("--checkpoint-dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    on_log = None
    if args.mlflow_run_id and os.environ.get("RANK", "0") == "0":
        import mlflow

        from kftune.tracking import configure

        configure()
        client = mlflow.MlflowClient()
        on_log = lambda metrics, step: [client.log_metric(args.mlflow_run_id, k, v, step=step)  # noqa: E731
                                        for k, v in metrics.items()]
    finetune(args.tokenized, args.out, args.model, FinetuneConfig(**json.loads(args.config)),
             checkpoint_dir=args.checkpoint_dir, on_log=on_log)


if __name__ == "__main__":
    main()
