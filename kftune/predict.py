"""Batched inference shared by validation, evaluation, the gate and the smoke test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL_INFO = "kftune.json"  # how the model was made, saved beside the weights


def pad_batch(seqs: list[list[int]], pad_id: int):
    """Pad to the longest sequence in this batch, never to max_length."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def predict_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int, bf16: bool = False,
                   embeddings: bool = False):
    """Logits for token-id sequences, in input order; sorts by length so batches carry little padding.

    With embeddings=True, also return the mean-pooled last hidden states (the drift step's embeddings).
    """
    import torch

    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros((len(seqs), model.config.num_labels), dtype=np.float32)
    pooled = np.zeros((len(seqs), model.config.hidden_size), dtype=np.float32) if embeddings else None
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(seqs), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=embeddings)
            out[idx] = res.logits.float().cpu().numpy()
            if embeddings:
                m = mask.to(device).unsqueeze(-1).float()
                pooled[idx] = ((res.hidden_states[-1].float() * m).sum(1) / m.sum(1)).cpu().numpy()
    return (out, pooled) if embeddings else out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def labels_of(model) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def predict_proba_with(model, tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Class probabilities for raw texts; the tokenizer's model_max_length is the training max_length."""
    seqs = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return softmax(predict_logits(model, seqs, tokenizer.pad_token_id, batch_size))


def predict_proba(model_dir: str | Path, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """Class probabilities for raw texts from a folder written by the fine-tune step."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return predict_proba_with(model, AutoTokenizer.from_pretrained(model_dir), texts, batch_size), labels_of(model)
