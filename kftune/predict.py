"""Batched inference shared by validation, evaluation, the gate and the smoke test."""

from __future__ import annotations

from dataclasses import dataclass

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


def length_groups(lengths, batch_size: int, pass_tokens: float | None = None) -> list[np.ndarray]:
    """Batches of indices into `lengths`, shortest first, each at most `batch_size` long.

    pass_tokens None: consecutive runs of `batch_size` in length order. A number: what one forward pass costs
    beyond its padded tokens, in padded tokens; the cuts then minimise sum(pass_tokens + rows x longest) over
    the batches (a dynamic programme over the sorted lengths). A few texts of mixed lengths (a server's
    micro-batch) are cut where padding the short ones to the long ones costs more than another pass.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    n = len(order)
    if pass_tokens is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    sorted_len = np.asarray(lengths, dtype=np.float64)[order]
    best, cut = np.zeros(n + 1), np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):  # best[end]: cheapest cover of the `end` shortest; the last batch is [cut, end)
        start = np.arange(max(0, end - batch_size), end)
        cost = best[start] + pass_tokens + (end - start) * sorted_len[end - 1]
        k = int(cost.argmin())
        best[end], cut[end] = cost[k], start[k]
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def pass_tokens(model, batch_size: int, length: int = 32, repeats: int = 3) -> float | None:
    """What one forward pass costs beyond its tokens, in padded tokens, timed on this machine: a pass of 1 and
    one of `batch_size` rows of `length` tokens (the fastest of `repeats` each) fit time = fixed + per-token x
    tokens. None when the timings do not give a positive per-token cost."""
    import time

    import torch

    device = next(model.parameters()).device
    ids = torch.full((batch_size, length), 1000 % model.config.vocab_size, dtype=torch.long, device=device)
    model.eval()

    def fastest(rows: int) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(input_ids=ids[:rows], attention_mask=torch.ones_like(ids[:rows]))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return min(times)

    fastest(1)  # first-call costs
    one, full = fastest(1), fastest(batch_size)
    per_token = (full - one) / ((batch_size - 1) * length) if batch_size > 1 else 0.0
    if per_token <= 0:
        return None
    return max(0.0, one / per_token - length)


def _forward(model, seqs: list[list[int]], pad_id: int, batch_size: int, bf16: bool, progress=None,
             pass_tokens: float | None = None, **kwargs):
    """Yield (indices, attention mask, model output) over batches of similar length (see length_groups).
    `progress` (a kftune.progress.Progress) is told of every batch."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for idx in length_groups([len(s) for s in seqs], batch_size, pass_tokens):
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
            mask = mask.to(device)
            yield idx, mask, model(input_ids=ids.to(device), attention_mask=mask, **kwargs)
            if progress is not None:
                progress.update(len(idx))


def predict_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int, bf16: bool = False,
                   embeddings: bool = False, progress=None, pass_tokens: float | None = None):
    """Logits for token-id sequences, in input order (pass_tokens: see length_groups).

    With embeddings=True, also return the mean-pooled last hidden states (the drift step's embeddings).
    """
    out = np.zeros((len(seqs), model.config.num_labels), dtype=np.float32)
    pooled = np.zeros((len(seqs), model.config.hidden_size), dtype=np.float32) if embeddings else None
    for idx, mask, res in _forward(model, seqs, pad_id, batch_size, bf16, progress, pass_tokens,
                                   output_hidden_states=embeddings):
        out[idx] = res.logits.float().cpu().numpy()
        if embeddings:
            m = mask.unsqueeze(-1).float()
            pooled[idx] = ((res.hidden_states[-1].float() * m).sum(1) / m.sum(1)).cpu().numpy()
    return (out, pooled) if embeddings else out


PACK_WIDTH = 128  # tokens per packed row (of 64/96/128/256, 96-128 were fastest on PhraseBank micro-batches)
PACKABLE = ("bert",)  # model types whose embeddings take restarting position_ids and whose head reads position 0


def pack_rows(lengths, width: int) -> list[list[int]]:
    """Indices into `lengths` grouped into rows of at most max(width, longest) tokens, first-fit decreasing."""
    width = max([width, *lengths])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def packed_batch(seqs: list[list[int]], rows: list[list[int]]):
    """Tensors for rows of packed sequences (pack_rows): input ids, restarting position ids, a block-diagonal
    (rows, 1, width, width) attention mask, and per sequence its row, first column and index into `seqs`.
    Padding is a segment of its own, so no query attends to nothing."""
    import torch

    cols = max(sum(len(seqs[i]) for i in row) for row in rows)
    ids = torch.zeros((len(rows), cols), dtype=torch.long)
    pos = torch.zeros((len(rows), cols), dtype=torch.long)
    seg = torch.full((len(rows), cols), -1, dtype=torch.long)
    r_at, c_at, order = [], [], []
    for r, row in enumerate(rows):
        c = 0
        for k, i in enumerate(row):
            n = len(seqs[i])
            ids[r, c : c + n] = torch.as_tensor(seqs[i])
            pos[r, c : c + n] = torch.arange(n)
            seg[r, c : c + n] = k
            r_at.append(r)
            c_at.append(c)
            order.append(i)
            c += n
    mask = (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)
    return ids, pos, mask, r_at, c_at, order


def packing_unsupported(model) -> str | None:
    """Why `packed_logits` cannot run this model, or None when it can."""
    cfg = model.config
    if cfg.model_type not in PACKABLE:
        return f"model type {cfg.model_type!r} is not one of {PACKABLE}"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r}, not 'sdpa'"
    if getattr(getattr(model, "base_model", None), "encoder", None) is None:
        return "no base_model.encoder"
    return None


def packed_logits(model, seqs: list[list[int]], batch_size: int, width: int = PACK_WIDTH) -> np.ndarray:
    """Sequence-classification logits, in input order, with several texts per row and no padding between them.

    Texts share a row (pack_rows) and attend only within themselves (a block-diagonal mask); positions restart
    at each text. The encoder's output is cut to each text's first token before the head runs, so the head
    (pooler, classifier) sees exactly what it sees for a padded batch. A micro-batch of texts of mixed lengths
    then costs about what the same texts cost sorted by length, instead of each padded to its longest
    (see benchmarks/predict_speed.py). A forward pass carries about `batch_size` x 64 tokens. Check
    `packing_unsupported(model)` first.
    """
    import torch

    device = next(model.parameters()).device
    width = min(width, getattr(model.config, "max_position_embeddings", width))  # BERT's token-type buffer
    rows = pack_rows([len(s) for s in seqs], width)
    rows_per_pass = max(1, batch_size * 64 // width)
    out = np.zeros((len(seqs), model.config.num_labels), dtype=np.float32)
    first: list = []

    def to_first_tokens(module, args, output):
        output.last_hidden_state = output.last_hidden_state[first[0], first[1]].unsqueeze(1)
        return output

    model.eval()
    hook = model.base_model.encoder.register_forward_hook(to_first_tokens)
    try:
        with torch.inference_mode():
            for at in range(0, len(rows), rows_per_pass):
                ids, pos, mask, r_at, c_at, order = packed_batch(seqs, rows[at : at + rows_per_pass])
                first[:] = [torch.tensor(r_at, device=device), torch.tensor(c_at, device=device)]
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=pos.to(device)).logits
                out[order] = logits.float().cpu().numpy()
    finally:
        hook.remove()
    return out


PACKED_MAX_PROB_DIFF = 0.02  # packed and padded answers may differ by rounding only (bf16 rounds to ~0.01)


@dataclass(frozen=True)
class Batching:
    """How a text classifier's texts share forward passes: packed rows, or padded batches cut by length."""
    packed: bool
    pass_tokens: float | None  # padded batches: a pass's fixed cost in padded tokens (see length_groups)
    reason: str


PADDED = Batching(False, None, "padded batches of max_batch in length order")


def choose_batching(model, seqs: list[list[int]], pad_id: int, batch_size: int) -> Batching:
    """Packed rows where the model supports them and they give padded batches' answers on `seqs` (same label,
    probabilities within PACKED_MAX_PROB_DIFF: int8's per-batch activation scales do not); else padded batches
    cut by length where padding costs more than another pass (the pass's cost timed here)."""
    why_not = packing_unsupported(model) or ("no texts to compare packed and padded answers on" if not seqs else None)
    if why_not is None:
        padded = softmax(predict_logits(model, seqs, pad_id, batch_size))
        try:
            packed = softmax(packed_logits(model, seqs, batch_size))
        except Exception as exc:  # noqa: BLE001 - a model this code did not foresee: serve it padded
            why_not = f"packing failed: {type(exc).__name__}: {str(exc)[:200]}"
        else:
            diff = float(np.abs(packed - padded).max())
            if (packed.argmax(1) == padded.argmax(1)).all() and diff <= PACKED_MAX_PROB_DIFF:
                return Batching(True, None, f"packed rows, no padding: on {len(seqs)} held-out texts the answers "
                                            f"match padded batches' (largest probability difference {diff:.4f})")
            why_not = (f"packed answers differ from padded batches' on {len(seqs)} held-out texts (largest "
                       f"probability difference {diff:.3f})")
    cost = pass_tokens(model, batch_size)
    return Batching(False, cost, f"padded batches ({why_not}); " + (
        "of max_batch in length order" if cost is None else
        f"a forward pass costs as much as {cost:.0f} padded tokens: batches are cut by length where padding "
        f"costs more"))


def batched_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int, batching: Batching) -> np.ndarray:
    """Classification logits in input order, batched as `batching` says (what serving and `kftune predict` run)."""
    if batching.packed:
        return packed_logits(model, seqs, batch_size)
    return predict_logits(model, seqs, pad_id, batch_size, pass_tokens=batching.pass_tokens)


def sentence_embeddings(model, seqs: list[list[int]], pad_id: int, batch_size: int,
                        bf16: bool = False, progress=None) -> np.ndarray:
    """Mean-pooled last hidden states, whatever the model's head (the drift step's embeddings of tagged text)."""
    pooled = np.zeros((len(seqs), model.config.hidden_size), dtype=np.float32)
    for idx, mask, res in _forward(model, seqs, pad_id, batch_size, bf16, progress, output_hidden_states=True):
        m = mask.unsqueeze(-1).float()
        pooled[idx] = ((res.hidden_states[-1].float() * m).sum(1) / m.sum(1)).cpu().numpy()
    return pooled


def predict_token_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int, bf16: bool = False) -> list:
    """Token classification: one (sequence length, labels) logits array per sequence, in input order."""
    out: list = [None] * len(seqs)
    for idx, _, res in _forward(model, seqs, pad_id, batch_size, bf16):
        logits = res.logits.float().cpu().numpy()
        for row, i in enumerate(idx):
            out[i] = logits[row, : len(seqs[i])]
    return out


def word_predictions(model, tokenizer, sentences: list[list[str]], batch_size: int = 64, bf16: bool = False):
    """Token classification: (tags, scores) per word of each sentence, read from each word's first sub-token.

    Long sentences are cut into windows of whole words as in training; predicted tags are made valid IOB2.
    """
    from kftune.ner import repaired

    tags, scores, _ = _word_tags(model, tokenizer, sentences, batch_size, bf16)
    return [repaired(t) for t in tags], scores


def _word_tags(model, tokenizer, sentences: list[list[str]], batch_size: int, bf16: bool = False):
    """word_predictions before the IOB2 repair, with, per word, whether the tokenizer gave it any token (one
    that it turns into nothing, such as U+200B, gets O and 0.0)."""
    from kftune.steps.tokenize import word_windows

    labels = labels_of(model)
    windows = word_windows(tokenizer, sentences, tokenizer.model_max_length)
    tags = [["O"] * len(words) for words in sentences]
    scores = [[0.0] * len(words) for words in sentences]
    tokenized = [[False] * len(words) for words in sentences]
    logits = predict_token_logits(model, [w.input_ids for w in windows], tokenizer.pad_token_id, batch_size, bf16)
    for w, window_logits in zip(windows, logits):
        probs, previous, i = softmax(window_logits), None, w.sentence
        for pos, word in enumerate(w.word_ids):
            if word is not None and word != previous:
                k = w.first + word
                tags[i][k], scores[i][k] = labels[int(probs[pos].argmax())], float(probs[pos].max())
                tokenized[i][k] = True
            previous = word
    return tags, scores, tokenized


def text_words(backend, texts: list[str]) -> list[list[tuple[str, tuple[int, int]]]]:
    """Per text, its words with their character offsets, as the tokenizer's backend splits it: its normalizer too
    (BERT's puts each CJK ideograph on its own, which the pre-tokenizer alone would leave as one word), then
    its pre-tokenizer (whitespace and punctuation). A word the tokenizer turns into nothing (U+200B) is left out."""
    backend.no_truncation()  # a long text is windowed later, as in training
    backend.no_padding()
    out = []
    for text, enc in zip(texts, backend.encode_batch(texts, add_special_tokens=False)):
        spans: dict[int, list[int]] = {}
        for w, (a, b) in zip(enc.word_ids, enc.offsets):
            if w is not None:
                span = spans.setdefault(w, [a, b])
                span[0], span[1] = min(span[0], a), max(span[1], b)
        words = []
        for a, b in spans.values():  # the raw characters behind each word, without spaces or a byte-order mark
            raw = text[a:b]  # around it (byte-level pre-tokenizers attach the leading space)
            word = raw.strip().strip("\ufeff").strip()
            if word:
                start = a + raw.find(word)
                words.append((word, (start, start + len(word))))
        out.append(words)
    return out


def predict_spans(model, tokenizer, texts: list[str], batch_size: int = 64, mask_pii: bool = False) -> list[list[dict]]:
    """Token classification on raw texts: per text, its entities (type, text, start, end, score).

    Words come from the tokenizer itself (text_words), with their character offsets; sub-tokens are grouped back
    into words and words into spans. mask_pii: the model trained on sentences read with ingest.mask_pii, so it
    sees each word masked as they were (the spans still point into the text as given).
    """
    from kftune.ner import char_spans, repaired
    from kftune.pii import mask_words

    split = text_words(tokenizer.backend_tokenizer, texts)
    words = [mask_words(text, [at for _, at in ws]) if mask_pii else [w for w, _ in ws]
             for text, ws in zip(texts, split)]
    tags, scores, tokenized = _word_tags(model, tokenizer, words, batch_size)
    spans = []
    for text, ws, t, s, kept in zip(texts, split, tags, scores, tokenized):
        # a word the tokenizer turns into nothing (a lone combining mark, U+200B, U+FE0F) gets no tag of its own:
        # left in, its O would cut the entity around it in two
        keep = [i for i, k in enumerate(kept) if k]
        spans.append(char_spans(text, [ws[i][1] for i in keep], repaired([t[i] for i in keep]), [s[i] for i in keep]))
    return spans


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def labels_of(model) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def predict_proba_with(model, tokenizer, texts: list[str], batch_size: int = 64, bf16: bool = False) -> np.ndarray:
    """Class probabilities for raw texts; the tokenizer's model_max_length is the training max_length."""
    seqs = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return softmax(predict_logits(model, seqs, tokenizer.pad_token_id, batch_size, bf16))
