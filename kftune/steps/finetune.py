"""fine-tune: the training loop for sequence classification.

A plain PyTorch loop rather than HF Trainer: on CPU its length-grouped sampler sorts each
mega-batch long-to-short without shuffling, which cost most of the accuracy here. Ours groups
by length *and* shuffles the batches, pads each batch only to its own longest text, and
checkpoints at optimizer-step boundaries so a killed run resumes exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from kftune.config import FinetuneConfig
from kftune.fileio import atomic_dir, read_json, write_json
from kftune.predict import MODEL_INFO, pad_batch, predict_logits

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
CHECKPOINT = "checkpoint.pt"


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


def macro_f1(y_true, y_pred, n_labels: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", labels=list(range(n_labels)), zero_division=0))


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
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)


def _read_split(tokenized_dir: Path, split: str, ner: bool):
    """(input ids, labels, word ids): labels one int per text, or (NER) one array per window with word ids."""
    df = pd.read_parquet(tokenized_dir / f"{split}.parquet")
    if ner:
        return [list(x) for x in df["input_ids"]], [np.array(y) for y in df["labels"]], list(df["word_ids"])
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


def validation_metrics(model, x, y, word_ids, pad_id: int, labels: list[str], batch_size: int, bf16: bool) -> dict:
    """Validation loss and score: macro-F1 for texts, entity F1 (seqeval) for tags on each word's first sub-token."""
    import torch

    from kftune.ner import IGNORE, entity_metrics, repaired
    from kftune.predict import predict_token_logits

    if word_ids is None:
        logits = predict_logits(model, x, pad_id, batch_size, bf16)
        loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
        return {"val_macro_f1": macro_f1(y, logits.argmax(1), len(labels)),
                "val_accuracy": float((logits.argmax(1) == y).mean()), "val_loss": loss}
    logits = predict_token_logits(model, x, pad_id, batch_size, bf16)
    flat_logits = np.concatenate([lg[yy != IGNORE] for lg, yy in zip(logits, y)])
    flat_y = np.concatenate([yy[yy != IGNORE] for yy in y])
    loss = float(torch.nn.functional.cross_entropy(torch.from_numpy(flat_logits), torch.from_numpy(flat_y)))
    gold, pred = [], []
    for lg, yy, ww in zip(logits, y, word_ids):
        first = [i for i, w in enumerate(ww) if w >= 0 and (i == 0 or ww[i - 1] != w)]
        gold.append([labels[yy[i]] for i in first])
        pred.append(repaired([labels[int(lg[i].argmax())] for i in first]))
    m = entity_metrics(gold, pred)
    return {"val_entity_f1": m["entity_f1"], "val_token_accuracy": m["token_accuracy"], "val_loss": loss}


def tokenized_digest(tokenized_dir: str | Path) -> str:
    """SHA-256 of the tokenized train and validation splits: what a checkpoint was trained on."""
    return hashlib.sha256(b"".join((Path(tokenized_dir) / f"{s}.parquet").read_bytes()
                                   for s in ("train", "validation"))).hexdigest()


def finetune(tokenized_dir: str | Path, out_dir: str | Path, model_name: str, cfg: FinetuneConfig,
             checkpoint_dir: str | Path | None = None, on_log: LogFn | None = None) -> dict:
    """Fine-tune the base model on the tokenized train split, early-stopping on validation macro-F1 (entity F1).

    Args:
        tokenized_dir: tokenize output ({split}.parquet, tokenizer/, tokenize_stats.json).
        out_dir: where the fine-tuned model, its tokenizer, kftune.json and training_history.json go.
        model_name: base model (see kftune.models).
        cfg: the `finetune` section of params.yaml.
        checkpoint_dir: where resumable checkpoints live; a checkpoint found there is resumed.
        on_log: called with (metrics, step) every log_every_steps and after every validation.

    Returns:
        A summary: steps, epochs, best validation macro-F1, examples/s, whether it resumed or stopped early.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              get_linear_schedule_with_warmup, set_seed)

    from kftune.hardware import setup
    from kftune.models import load_pretrained, resolve_base_model

    tokenized_dir = Path(tokenized_dir)
    stats = read_json(tokenized_dir / "tokenize_stats.json")
    labels = stats["labels"]
    on_log = on_log or (lambda metrics, step: None)
    hw = setup(cfg.bf16, cfg.threads)
    bf16 = hw["precision"] == "bf16"
    set_seed(cfg.seed)

    task = stats.get("task", "sequence-classification")
    ner = task == "token-classification"
    score_key = "val_entity_f1" if ner else "val_macro_f1"
    train_x, train_y, _ = _read_split(tokenized_dir, "train", ner)
    val_x, val_y, val_words = _read_split(tokenized_dir, "validation", ner)
    lengths = np.array([len(x) for x in train_x])
    tokenizer = AutoTokenizer.from_pretrained(tokenized_dir / "tokenizer")
    pad_id = tokenizer.pad_token_id

    model = load_pretrained(AutoModelForTokenClassification if ner else AutoModelForSequenceClassification,
                            resolve_base_model(model_name),
                            num_labels=len(labels), id2label=dict(enumerate(labels)),
                            label2id={lbl: i for i, lbl in enumerate(labels)})
    _freeze(model, cfg)
    # Under torchrun there is one process per GPU (or per CPU worker, with gloo); each trains on
    # its share of every epoch's batches and DDP averages the gradients. Alone, one GPU if present.
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    model.to(device)
    train_model = model
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        torch.manual_seed(cfg.seed + rank)  # the same weights everywhere (DDP broadcasts them), other dropout
        if rank:
            on_log = lambda metrics, step: None  # noqa: E731 - rank 0 reports for everyone
    optimizer = _optimizer(model, cfg)
    micro_per_epoch = math.ceil(len(train_x) / cfg.batch_size) // world
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    eval_every = cfg.eval_every_steps or steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)

    state = {"step": 0, "epoch": 0, "micro": 0, "best_f1": -1.0, "best_step": 0, "bad_evals": 0, "history": []}
    best_weights = None
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    exported = Path(model_name) / MODEL_INFO  # a champion exported by resolve: a new folder in every pipeline run
    version = read_json(exported).get("version") if exported.exists() else None
    start = f"registry version {version}" if version else model_name
    fingerprint = {"model": start, "cfg": vars(cfg), "data": tokenized_digest(tokenized_dir), "labels": labels}
    resumed_from = 0
    if ckpt_path and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False, map_location=device)
        if ckpt["fingerprint"] == fingerprint:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["torch_rng"].cpu())
            state, best_weights = ckpt["state"], ckpt["best_weights"]
            resumed_from = state["step"]
            log.info("fine-tune: resuming from %s at step %d", ckpt_path, resumed_from)
        else:
            log.warning("fine-tune: ignoring %s, it was made with other data or settings", ckpt_path)

    def save_checkpoint():
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "state": state,
                    "best_weights": best_weights}, tmp)
        os.replace(tmp, ckpt_path)

    def validate() -> bool:
        """Record a validation; return True when patience has run out."""
        nonlocal best_weights
        metrics = validation_metrics(model, val_x, val_y, val_words, pad_id, labels, cfg.batch_size * 2, bf16)
        f1, loss = metrics[score_key], metrics["val_loss"]
        state["history"].append({"step": state["step"], **metrics})
        on_log(metrics, state["step"])
        log.info("fine-tune step %d: %s %.4f, loss %.4f", state["step"], score_key, f1, loss)
        if f1 > state["best_f1"]:
            state.update(best_f1=f1, best_step=state["step"], bad_evals=0)
            best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            state["bad_evals"] += 1
        model.train()
        return bool(cfg.early_stopping_patience) and state["bad_evals"] >= cfg.early_stopping_patience

    model.train()
    seen, train_seconds, running_loss = 0, 0.0, []
    stopped_early = bool(cfg.early_stopping_patience) and state["bad_evals"] >= cfg.early_stopping_patience
    bar = tqdm(total=total_steps, initial=state["step"], desc="fine-tune", unit="step", mininterval=2,
               disable=None if rank == 0 else True)
    while state["epoch"] < epochs and state["step"] < total_steps and not stopped_early:
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, state["epoch"], cfg.group_by_length)
        batches = batches[: len(batches) // world * world][rank::world]  # every process the same count
        t0 = time.perf_counter()
        while state["micro"] < len(batches):
            idx = batches[state["micro"]]
            ids, mask = pad_batch([train_x[i] for i in idx], pad_id)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = train_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   labels=_batch_labels(train_y, idx, ids.shape[1], ner).to(device)).loss
            group_start = state["micro"] - state["micro"] % cfg.grad_accum_steps
            (loss / min(cfg.grad_accum_steps, len(batches) - group_start)).backward()  # a short last group too
            running_loss.append(loss.item())
            seen += len(idx) * world
            state["micro"] += 1
            if state["micro"] % cfg.grad_accum_steps and state["micro"] < len(batches):
                continue
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            train_seconds += time.perf_counter() - t0
            rate = seen / max(train_seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(running_loss[-20:]):.4f}", ex_s=f"{rate:.1f}")
            if state["step"] % cfg.log_every_steps == 0:
                metrics = {"train_loss": float(np.mean(running_loss)), "learning_rate": scheduler.get_last_lr()[0],
                           "examples_per_second": rate}
                state["history"].append({"step": state["step"], **metrics})
                running_loss = []
                on_log(metrics, state["step"])
                if bar.disable:  # no terminal (a pipeline pod): progress goes to the log instead
                    log.info("fine-tune step %d/%d: loss %.4f, %.1f examples/s", state["step"], total_steps,
                             metrics["train_loss"], rate)
            if state["step"] % eval_every == 0 or state["step"] >= total_steps:
                stopped_early = validate() or stopped_early
            if state["micro"] >= len(batches):
                state.update(epoch=state["epoch"] + 1, micro=0)
            every = cfg.checkpoint_every_steps
            if rank == 0 and ckpt_path and every and state["step"] % every == 0:
                save_checkpoint()
            t0 = time.perf_counter()
            if stopped_early or state["step"] >= total_steps or state["micro"] == 0:  # micro 0: epoch done
                break
    bar.close()

    model.load_state_dict(best_weights)  # restore the best validation checkpoint
    summary = {
        "steps": state["step"], "epochs_completed": state["epoch"], "total_steps_planned": total_steps,
        f"best_{score_key}": state["best_f1"], "best_step": state["best_step"], "stopped_early": stopped_early,
        "resumed_from_step": resumed_from, "train_examples": len(train_x),
        "examples_per_second": seen / max(train_seconds, 1e-9), "train_seconds": train_seconds,
        "processes": world, **hw,
    }
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank:
            return summary  # rank 0 writes the model
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.model_max_length = stats["max_length"]  # so every later user truncates as training did
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MODEL_INFO, {"labels": labels, "max_length": stats["max_length"], "base_model": model_name,
                                      "task": task})
        write_json(tmp / "training_history.json", state["history"])
        write_json(tmp / "train_summary.json", summary)
    if ckpt_path and ckpt_path.exists():
        ckpt_path.unlink()  # finished: a later run with the same key must start fresh
    log.info("fine-tune: %s", summary)
    return summary
