"""Side by side on one CPU: the seeds' loop (A), HF Trainer (B) and kftune's fine-tune step (K).

Financial PhraseBank all-agree, stratified 80/20 (`random_state=0`: 1,811 train / 453 held-out rows),
MiniLM-L6. Every measurement runs in its own process (this script, `--child`), so each peak RSS and
each timing is its own. The run prints one table and writes every number, with the CPU, its flags,
the load average and a fp32/bf16 matmul peak, to benchmarks/results/sidebyside-<cpu>-<bf16|fp32>.json.

1. Equal settings (lr 2e-5, 1 epoch, batch 16): train examples/s, real (non-pad) tokens/s, share of
   the matmul peak, macro-F1 on the 453 rows, peak RSS, K/A and K/B.
2. Time to quality, each recipe with its own defaults: training seconds until held-out macro-F1
   first reaches A's final score, and the final score.
3. Inference on the 453 texts: `pipeline`, a sorted fp32 loop, and kftune's predict path per
   precision (fp32, bf16, int8 dynamic quantisation) with agreement against fp32.
4. With --research: where K's step time goes (phase timers, torch.profiler, RSS by stage) and K-like
   variants (attention kernel, batching, packing, threads, affinity, optimizer, torch.compile).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sidebyside.py [--research] [--only research]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHRASEBANK = ROOT.parent / "shared" / "data" / "financial_phrasebank" / "sentences_allagree.csv"
MODEL = "minilm-l6"
MAX_LENGTH = 128
SEED = 42
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "KFTUNE_CPUINFO")
EQUAL = {"learning_rate": 2e-5, "epochs": 1, "batch_size": 16}
CHILDREN = {}
REUSE = {"on": False}  # --resume: a child whose result (for the same spec) is already in the work dir is not rerun


# ---------------------------------------------------------------- shared helpers

def child(fn):
    CHILDREN[fn.__name__] = fn
    return fn


def base_model_path() -> str:
    from kftune.base_models import resolve_base_model

    return resolve_base_model(MODEL)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def native_bf16() -> tuple[bool, str]:
    from kftune.hardware import choose_bf16, cpu_flags

    choice = choose_bf16("auto", "cpu", False, cpu_flags())
    return bool(choice.value), choice.reason


def rss_mb(peak: bool = True) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def macro_f1(y_true, y_pred) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2], zero_division=0))


def read_split(work: Path) -> dict:
    return json.loads((work / "split.json").read_text())


def train_flops_per_token() -> float:
    """Forward + backward FLOPs per real token of MiniLM-L6's encoder matmuls (6 x non-embedding params)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(base_model_path())
    per_layer = 4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size
    return 6.0 * per_layer * c.num_hidden_layers


def matmul_gflops(dtype_name: str, n: int = 1024, reps: int = 30) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(min(3, reps)):
        a @ b
    best = float("inf")
    for _ in range(3):  # best of three: the peak this CPU reaches, least disturbed by other load
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best / 1e9


# ---------------------------------------------------------------- children: setup

@child
def machine(spec: dict, work: Path) -> dict:
    import torch

    from kftune.hardware import allocator, cpu_flags

    flags = cpu_flags()
    bf16, reason = native_bf16()
    return {"cpu": cpu_model(), "flags": {f: f in flags for f in SPEED_FLAGS}, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bf16, "bf16_reason": reason, "python": platform.python_version(),
            "allocator": allocator(),  # every child's: they inherit this one's environment (LD_PRELOAD)
            # an AVX2-only CPU imitated on a bigger one: kernels capped at AVX2, flags read from an edited cpuinfo
            "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ},
            "matmul_gflops_fp32": matmul_gflops("float32"),
            # emulated bf16 runs at ~1 GFLOP/s: 30 repetitions of it took 4 minutes on an AVX2 CPU
            "matmul_gflops_bf16": matmul_gflops("bfloat16", reps=30 if bf16 else 1)}


@child
def prep(spec: dict, work: Path) -> dict:
    """The split, an ingest-like folder (kftune.steps.ingest.write_dataset) and kftune's tokenize output."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    from kftune.config import load_params
    from kftune.tables import write_dataset
    from kftune.steps.tokenize import tokenize

    df = pd.read_csv(PHRASEBANK)
    labels = sorted(df["label"].unique())
    train, test = train_test_split(df, test_size=0.2, stratify=df["label"], random_state=0)
    if spec.get("rows"):
        train = train.iloc[: spec["rows"]]
    split = {"labels": labels,
             "train": {"text": train["text"].tolist(), "label": [labels.index(v) for v in train["label"]]},
             "test": {"text": test["text"].tolist(), "label": [labels.index(v) for v in test["label"]]}}
    (work / "split.json").write_text(json.dumps(split))
    # kftune validates on its validation split: here the 453 held-out rows, so its per-eval scores are the table's
    both = pd.concat([train.assign(split="train"), test.assign(split="validation"), test.assign(split="test")])
    write_dataset(work / "data", both, {"labels": labels, "task": "sequence-classification", "rows": len(df)})
    params = load_params(ROOT / "params.yaml", [f"model.name={MODEL}", f"tokenize.max_length={MAX_LENGTH}"])
    tokenize(work / "data", work / "tok", MODEL, params.tokenize)
    train_len = pd.read_parquet(work / "tok" / "train.parquet")["input_ids"].map(len).to_numpy()
    test_len = pd.read_parquet(work / "tok" / "test.parquet")["input_ids"].map(len).to_numpy()
    return {"train_rows": len(train), "test_rows": len(test), "labels": labels,
            "train_tokens": int(train_len.sum()), "test_tokens": int(test_len.sum()),
            "train_tokens_mean": float(train_len.mean()), "train_tokens_p95": float(np.percentile(train_len, 95)),
            "train_tokens_max": int(train_len.max()), "flops_per_train_token": train_flops_per_token()}


# ---------------------------------------------------------------- children: training recipes

@child
def seeds_loop(spec: dict, work: Path) -> dict:
    """A: tokenize one text per item, padded to 128; DataLoader(shuffle=True); AdamW; constant lr; fp32."""
    import torch
    from torch.utils.data import DataLoader, Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    split = read_split(work)
    set_seed(SEED)
    tok = AutoTokenizer.from_pretrained(base_model_path())

    class Texts(Dataset):
        def __init__(self, part):
            self.texts, self.labels = part["text"], part["label"]

        def __len__(self):
            return len(self.texts)

        def __getitem__(self, i):
            enc = tok(self.texts[i], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                      return_tensors="pt")
            return {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0],
                    "labels": torch.tensor(self.labels[i])}

    model = AutoModelForSequenceClassification.from_pretrained(base_model_path(), num_labels=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["learning_rate"])
    loader = DataLoader(Texts(split["train"]), batch_size=spec["batch_size"], shuffle=True)

    def evaluate() -> float:
        model.eval()
        preds = []
        with torch.no_grad():
            for batch in DataLoader(Texts(split["test"]), batch_size=64):
                preds += model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(1).tolist()
        model.train()
        return macro_f1(split["test"]["label"], preds)

    points, train_s, cpu_s, padded, seen = [], 0.0, 0.0, 0, 0
    model.train()
    for epoch in range(spec["epochs"]):
        t, c = time.perf_counter(), time.process_time()
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            padded += batch["input_ids"].numel()
            seen += len(batch["labels"])
        train_s += time.perf_counter() - t
        cpu_s += time.process_time() - c
        points.append({"epoch": epoch + 1, "train_seconds": train_s, "macro_f1": evaluate()})
    return {"train_seconds": train_s, "cpu_seconds": cpu_s, "examples_seen": seen, "padded_tokens": padded,
            "macro_f1": points[-1]["macro_f1"], "points": points, "precision": "fp32", "schedule": "constant"}


@child
def trainer(spec: dict, work: Path) -> dict:
    """B: HF Trainer, length-grouped sampling, bf16 only where native; spec holds the TrainingArguments."""
    import dataclasses

    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    split = read_split(work)
    set_seed(SEED)
    tok = AutoTokenizer.from_pretrained(base_model_path())

    def encoded(part):
        enc = tok(part["text"], truncation=True, max_length=MAX_LENGTH)
        return [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], part["label"])]

    train_ds, test_ds = encoded(split["train"]), encoded(split["test"])
    model = AutoModelForSequenceClassification.from_pretrained(base_model_path(), num_labels=3)
    padded = [0]

    def count_padded(module, args, kwargs):
        if module.training:
            padded[0] += kwargs["input_ids"].numel()

    model.register_forward_pre_hook(count_padded, with_kwargs=True)
    bf16, _ = native_bf16()
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    sampling = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                else {"group_by_length": True})
    args = TrainingArguments(output_dir=str(work / f"trainer-{spec['tag']}"), use_cpu=True, bf16=bf16, seed=SEED,
                             report_to="none", save_strategy="no", disable_tqdm=True,
                             # time to quality: B validated as often as K (every 320 examples), not per epoch
                             **({"eval_strategy": "steps", "eval_steps": spec["eval_every_steps"]}
                                if spec.get("eval_every_steps") else {"eval_strategy": "no"}),
                             **sampling, **spec.get("args", {}))
    points = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0, self.c0, self.evals = time.perf_counter(), time.process_time(), 0.0

        def on_evaluate(self, args, state, control, metrics=None, **k):
            self.evals += metrics["eval_runtime"]
            points.append({"epoch": state.epoch, "train_seconds": time.perf_counter() - self.t0 - self.evals,
                           "macro_f1": metrics["eval_macro_f1"]})

    clock = Clock()

    def compute_metrics(pred):
        return {"macro_f1": macro_f1(pred.label_ids, pred.predictions.argmax(1))}

    tr = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=test_ds, processing_class=tok,
                 data_collator=DataCollatorWithPadding(tok), compute_metrics=compute_metrics, callbacks=[clock])
    out = tr.train()
    cpu_s = time.process_time() - clock.c0
    train_s = out.metrics["train_runtime"] - clock.evals
    final = points[-1]["macro_f1"] if points else compute_metrics(tr.predict(test_ds))["macro_f1"]
    return {"train_seconds": train_s, "cpu_seconds": cpu_s, "examples_seen": len(train_ds) * args.num_train_epochs,
            "padded_tokens": padded[0], "macro_f1": final, "points": points,
            "precision": "bf16" if bf16 else "fp32", "sampling": sampling,
            "settings": {"learning_rate": args.learning_rate, "epochs": args.num_train_epochs,
                         "batch_size": args.per_device_train_batch_size, "scheduler": str(args.lr_scheduler_type),
                         "warmup": args.warmup_steps, "weight_decay": args.weight_decay},
            "torch_threads": torch.get_num_threads()}


@child
def kftune_step(spec: dict, work: Path) -> dict:
    """K: kftune.steps.finetune.finetune on the tokenize output, params.yaml plus spec["overrides"].

    The step's own train_seconds/examples_per_second exclude validation; the wrappers below only add
    the clock time of each validation, so time-to-quality excludes evaluation as for A and B.
    """
    import kftune.steps.finetune as ft
    from kftune.config import load_params

    params = load_params(ROOT / "params.yaml", [f"model.name={MODEL}", "finetune.checkpoint_every_steps=0",
                                                *spec.get("overrides", [])])
    clock = {"start": None, "evals": 0.0, "padded": 0, "points": []}
    if hasattr(ft, "pad_batch"):
        pad = ft.pad_batch

        def timed_pad(seqs, pad_id):
            clock["start"] = clock["start"] or time.perf_counter()
            ids, mask = pad(seqs, pad_id)
            clock["padded"] += ids.numel()
            return ids, mask

        ft.pad_batch = timed_pad
    if hasattr(ft, "validation_metrics"):
        validate = ft.validation_metrics

        def timed_validate(*a, **k):
            t = time.perf_counter()
            metrics = validate(*a, **k)
            clock["points"].append({"train_seconds": t - (clock["start"] or t) - clock["evals"],
                                    "macro_f1": metrics.get("val_macro_f1")})
            clock["evals"] += time.perf_counter() - t
            return metrics

        ft.validation_metrics = timed_validate
    steps = []

    def on_log(metrics, step):
        if "val_macro_f1" in metrics:
            steps.append(step)

    c = time.process_time()
    summary = ft.finetune(work / "tok", work / spec["out"], MODEL, params.finetune, on_log=on_log)
    cpu_s = time.process_time() - c
    points = [{**p, "step": s} for p, s in zip(clock["points"], steps)]
    history = json.loads((work / spec["out"] / "training_history.json").read_text())
    vals = [h["val_macro_f1"] for h in history if "val_macro_f1" in h]
    return {"train_seconds": summary["train_seconds"], "cpu_seconds_incl_setup": cpu_s,
            "examples_seen": summary["examples_per_second"] * summary["train_seconds"],
            "padded_tokens": clock["padded"], "macro_f1": vals[-1], "best_macro_f1": max(vals), "points": points,
            "precision": summary.get("precision"), "precision_reason": summary.get("precision_reason"),
            "torch_threads": summary.get("threads"), "summary": summary,
            "settings": {k: getattr(params.finetune, k) for k in ("learning_rate", "epochs", "batch_size",
                                                                  "warmup_ratio", "weight_decay", "max_grad_norm",
                                                                  "group_by_length", "bf16", "eval_every_steps",
                                                                  "early_stopping_patience")}}


# ---------------------------------------------------------------- children: inference

INFER_PASSES = 3


@child
def infer(spec: dict, work: Path) -> dict:
    """One inference path over the 453 held-out texts (after a warm-up on 32 of them); saves its predictions."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    split = read_split(work)
    texts, y = split["test"]["text"], split["test"]["label"]
    model_dir = str(work / spec["model"])
    kind, model = spec["kind"], None
    if kind.startswith("pipeline"):
        from transformers import pipeline

        pipe = pipeline("text-classification", model=model_dir, device=-1)
        kw = {"batch_size": spec["batch_size"]} if spec.get("batch_size") else {}
        label2id = pipe.model.config.label2id
        run = lambda items: [label2id[o["label"]] for o in pipe(items, **kw)]  # noqa: E731
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        if kind == "sorted-fp32":
            def run(items):
                enc = tok(items, truncation=True, max_length=MAX_LENGTH)["input_ids"]
                order, out = np.argsort([len(e) for e in enc]), np.zeros(len(items), dtype=int)
                with torch.inference_mode():
                    for s in range(0, len(items), 64):
                        idx = order[s: s + 64]
                        batch = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
                        out[idx] = model(**batch).logits.argmax(1).numpy()
                return out.tolist()
        else:
            from kftune.predict import predict_proba_with

            if spec["precision"] == "int8":  # as served: smoothing calibrated on training rows, fp32 fallback
                from kftune.config import load_params
                from kftune.serving.model import int8_recipe
                from kftune.serving.precision import convert

                cfg = load_params(ROOT / "params.yaml").serve
                calibration = split["train"]["text"][: cfg.int8_calibration_rows]
                model = convert(model, "int8", int8_recipe(cfg, tok, calibration))
            bf16 = spec["precision"] == "bf16"
            run = lambda items: predict_proba_with(model, tok, items, 64, bf16).argmax(1).tolist()  # noqa: E731
    run(texts[:32])
    if hasattr(model, "reset_counts"):  # int8's fp32 fallback: count the measured texts only
        model.reset_counts()
    passes = []  # the median of three timed passes: one pass of a few seconds moves with the machine's moment
    for _ in range(INFER_PASSES):
        t, c = time.perf_counter(), time.process_time()
        preds = run(texts)
        passes.append((time.perf_counter() - t, time.process_time() - c))
    seconds, cpu_s = sorted(passes)[len(passes) // 2]
    (work / f"preds-{spec['tag']}.json").write_text(json.dumps(preds))
    out = {"seconds": seconds, "cpu_seconds": cpu_s, "texts_per_second": len(texts) / seconds,
           "pass_seconds": [round(p[0], 3) for p in passes],
           "macro_f1": macro_f1(y, preds), "torch_threads": torch.get_num_threads()}
    if hasattr(model, "reset_counts"):
        out["fp32_share"] = model.recomputed / model.seen
    return out


# ---------------------------------------------------------------- children: research (K-like loop)

def _batches(lengths, spec) -> list:
    """K's batches (kftune's epoch_batches), or a variant: a whole-epoch sort, or random batches for packing."""
    from kftune.steps.finetune import epoch_batches

    bs = spec["batch_size"]
    rng = np.random.default_rng([SEED, 0])
    if spec.get("batching") == "random":
        perm = rng.permutation(len(lengths))
        return [perm[i: i + bs] for i in range(0, len(perm), bs)]
    if spec.get("batching") == "epoch-sorted":
        perm = rng.permutation(len(lengths))
        perm = perm[np.argsort(lengths[perm], kind="stable")]
        batches = [perm[i: i + bs] for i in range(0, len(perm), bs)]
        return [batches[i] for i in rng.permutation(len(batches))]
    return epoch_batches(lengths, bs, SEED, 0, True)


def _padded_batch(seqs, pad_id: int, multiple: int):
    import torch

    from kftune.predict import pad_batch

    ids, mask = pad_batch(seqs, pad_id)
    extra = -ids.shape[1] % multiple
    if extra:
        ids = torch.nn.functional.pad(ids, (0, extra), value=pad_id)
        mask = torch.nn.functional.pad(mask, (0, extra), value=0)
    return ids, mask


def _packed_loss(model, seqs, labels, row: int = MAX_LENGTH):
    """Padding-free: sequences packed first-fit into rows of `row` tokens with a block-diagonal 4D mask,
    positions restarting per sequence, and each sequence's [CLS] pooled and classified."""
    import torch

    from kftune.predict import pack_rows, packed_batch

    ids, pos, mask, cls_r, cls_c, order = packed_batch(seqs, pack_rows([len(s) for s in seqs], row))
    base = model.bert
    hidden = base(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    pooled = base.pooler.activation(base.pooler.dense(hidden[cls_r, cls_c]))
    logits = model.classifier(model.dropout(pooled))
    return torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels)[order]), int(ids.numel())


@child
def k_like(spec: dict, work: Path) -> dict:
    """K's training step rebuilt from kftune's own pieces (batches, padding, optimizer, schedule) with
    phase timers, so one idea at a time can be measured on the same batches without editing the step."""
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup, set_seed

    from kftune.config import load_params
    from kftune.steps.finetune import _optimizer

    stages = {"imports": rss_mb(peak=False)}
    torch.set_num_threads(spec.get("threads", len(os.sched_getaffinity(0))))
    cfg = load_params(ROOT / "params.yaml", [f"model.name={MODEL}", f"finetune.batch_size={spec['batch_size']}",
                                             *spec.get("overrides", [])]).finetune
    bf16 = spec["precision"] == "bf16"
    set_seed(SEED)
    df = pd.read_parquet(work / "tok" / "train.parquet")
    x, y = [list(v) for v in df["input_ids"]], df["label"].to_numpy()
    lengths = np.array([len(v) for v in x])
    pad_id = AutoTokenizer.from_pretrained(work / "tok" / "tokenizer").pad_token_id
    extra = {"attention_probs_dropout_prob": spec["attn_dropout"]} if "attn_dropout" in spec else {}
    model = AutoModelForSequenceClassification.from_pretrained(base_model_path(), num_labels=3,
                                                               attn_implementation=spec.get("attn", "sdpa"), **extra)
    if spec.get("freeze_embeddings"):
        model.bert.embeddings.requires_grad_(False)
    stages["model_loaded"] = rss_mb(peak=False)
    if spec.get("fused"):
        groups = _optimizer(model, cfg).param_groups
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "weight_decay")}
                                       for g in groups], lr=cfg.learning_rate, fused=True)
    else:
        optimizer = _optimizer(model, cfg)
    batches = _batches(lengths, spec)
    need = spec["warmup_steps"] + spec["steps"] + spec.get("profile_steps", 0)
    batches = batches * -(-need // len(batches))  # a short trial (--rows) repeats its epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * len(batches)), len(batches))
    net = model
    if spec.get("compile"):
        net = torch.compile(model, dynamic=spec.get("dynamic"))
    warm, steps = spec["warmup_steps"], spec["steps"]
    phases = {k: 0.0 for k in ("data", "forward", "backward", "optimizer")}
    first_steps, seen, real, padded = [], 0, 0, 0
    profile = spec.get("profile_steps", 0)
    prof = None
    model.train()
    t_all, c_all = None, None
    for i, idx in enumerate(batches[: warm + steps + profile]):
        if i == warm:
            t_all, c_all = time.perf_counter(), time.process_time()
        if i == warm + steps and profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            prof = torch_profile(activities=[ProfilerActivity.CPU])
            prof.__enter__()
        t0 = time.perf_counter()
        seqs = [x[j] for j in idx]
        labels = torch.as_tensor(y[idx])
        if not spec.get("pack"):
            ids, mask = _padded_batch(seqs, pad_id, spec.get("pad_multiple", 1))
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if spec.get("pack"):
                loss, width_tokens = _packed_loss(model, seqs, labels)
            else:
                loss = net(input_ids=ids, attention_mask=mask, labels=labels).loss
                width_tokens = int(ids.numel())
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i == 0:
            stages["after_first_step"] = rss_mb(peak=False)
        if i < warm:
            first_steps.append(t4 - t0)
        elif i < warm + steps:
            for k, d in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k] += d
            seen += len(idx)
            real += int(lengths[idx].sum())
            padded += width_tokens
        if i == warm + steps - 1:
            wall, cpu = time.perf_counter() - t_all, time.process_time() - c_all
    out = {"steps": steps, "examples": seen, "seconds": wall, "cpu_seconds": cpu,
           "examples_per_second": seen / wall, "real_tokens_per_second": real / wall, "padding_share": 1 - real / padded,
           "phases_seconds": phases, "phases_share": {k: v / sum(phases.values()) for k, v in phases.items()},
           "warmup_step_seconds": first_steps, "last_loss": float(loss.detach()), "rss_mb_by_stage": stages,
           "epoch_padding_share": _epoch_padding(lengths, spec), "threads": torch.get_num_threads()}
    if prof is not None:
        prof.__exit__(None, None, None)
        out["profile_top_ops"] = _top_ops(prof)
    return out


def _epoch_padding(lengths, spec) -> float:
    """Share of pad tokens over a whole epoch of this variant's batches (packing: rows of 128)."""
    batches = _batches(lengths, spec)
    if spec.get("pack"):
        return float("nan")
    m = spec.get("pad_multiple", 1)
    padded = sum(len(b) * (-(-lengths[b].max() // m) * m) for b in batches)
    return float(1 - lengths.sum() / padded)


def _top_ops(prof, n: int = 15) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_share": e.self_cpu_time_total / total, "calls": e.count,
             "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in events[:n]]


# ---------------------------------------------------------------- parent

def run_child(name: str, spec: dict, work: Path, tag: str, env: dict | None = None, fatal: bool = True) -> dict:
    out = work / f"result-{tag}.json"
    spec_file = work / f"spec-{tag}.json"
    if REUSE["on"] and out.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        result = {**json.loads(out.read_text()), "reused_from_an_earlier_run": True}  # said in the JSON
        print(f"  {tag:<24} reused from the interrupted run  load {result['load_start'][0]:.2f}"
              f"->{result['load_end'][0]:.2f}  peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
        return result
    spec_file.write_text(json.dumps(spec))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--tag", tag, "--work", str(work)],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode or not out.exists():
        sys.stderr.write(proc.stderr[-4000:])
        if fatal:
            raise SystemExit(f"child {tag} ({name}) failed with exit code {proc.returncode}")
        print(f"  {tag:<24} FAILED (exit code {proc.returncode}); recorded, run goes on", flush=True)
        return {"failed": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - t
    print(f"  {tag:<24} done in {result['process_seconds']:6.1f} s  load {result['load_start'][0]:.2f}"
          f"->{result['load_end'][0]:.2f}  peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def child_main(name: str, tag: str, work: Path) -> None:
    spec = json.loads((work / f"spec-{tag}.json").read_text())
    load_start = os.getloadavg()
    result = CHILDREN[name](spec, work)
    result.update(load_start=load_start, load_end=os.getloadavg(), peak_rss_mb=rss_mb())
    (work / f"result-{tag}.json").write_text(json.dumps(result, default=float))


def training_rows(res: dict, data: dict, peak_fp32: float) -> None:
    """Add rates to each training result: examples/s, real tokens/s, share of the fp32 matmul peak."""
    for r in res.values():
        epochs = r["examples_seen"] / data["train_rows"]
        r["examples_per_second"] = r["examples_seen"] / r["train_seconds"]
        r["real_tokens_per_second"] = data["train_tokens"] * epochs / r["train_seconds"]
        r["padding_share"] = 1 - data["train_tokens"] * epochs / r["padded_tokens"] if r["padded_tokens"] else None
        r["share_of_fp32_matmul_peak"] = r["real_tokens_per_second"] * data["flops_per_train_token"] / (peak_fp32 * 1e9)


def time_to(points: list[dict], target: float) -> float | None:
    return next((p["train_seconds"] for p in points if p["macro_f1"] is not None and p["macro_f1"] >= target), None)


def table(report: dict) -> str:
    m, eq, ttq, inf = report["machine"], report["equal_settings"], report["time_to_quality"], report["inference"]
    lines = [f"CPU {m['cpu']}, {m['usable_cores']} cores, flags {' '.join(f for f, on in m['flags'].items() if on)}; "
             f"torch {m['torch']} ({m['torch_threads']} threads, {m.get('allocator', 'libc malloc')}); "
             f"matmul fp32 {m['matmul_gflops_fp32']:.1f} / bf16 "
             f"{m['matmul_gflops_bf16']:.1f} GFLOP/s (start), {report['machine_end']['matmul_gflops_fp32']:.1f} / "
             f"{report['machine_end']['matmul_gflops_bf16']:.1f} (end); {m['bf16_reason']}"
             + "".join(f"; {k}={v}" for k, v in m.get("isa_caps", {}).items()),
             "", "Equal settings: lr 2e-5, 1 epoch, batch 16, 1,811 train rows, macro-F1 on the 453 held-out rows",
             f"{'recipe':<34}{'prec':>5}{'ex/s':>8}{'real tok/s':>11}{'% fp32 peak':>12}{'pad %':>7}{'macro-F1':>9}"
             f"{'peak RSS':>10}{'load 1m':>13}"]
    for tag, r in eq.items():
        lines.append(f"{r['label']:<34}{r['precision']:>5}{r['examples_per_second']:8.1f}{r['real_tokens_per_second']:11.0f}"
                     f"{100 * r['share_of_fp32_matmul_peak']:11.0f}%{100 * (r['padding_share'] or 0):6.0f}%"
                     f"{r['macro_f1']:9.3f}{r['peak_rss_mb'] / 1024:8.2f} GB"
                     f"{r['load_start'][0]:7.2f}->{r['load_end'][0]:.2f}")
    for k, v in report["ratios"].items():
        lines.append(f"  {k}: {v:.2f}x")
    lines += ["", f"Time to quality (own defaults; target = A's final macro-F1 {report['target_f1']:.3f})",
              f"{'recipe':<50}{'train s':>9}{'to target':>11}{'final F1':>9}{'best F1':>8}{'peak RSS':>10}{'load 1m':>13}"]
    for tag, r in ttq.items():
        reach = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] is not None else "never"
        lines.append(f"{r['label']:<50}{r['train_seconds']:9.1f}{reach:>11}{r['macro_f1']:9.3f}"
                     f"{r.get('best_macro_f1', max(p['macro_f1'] for p in r['points'])):8.3f}"
                     f"{r['peak_rss_mb'] / 1024:8.2f} GB{r['load_start'][0]:7.2f}->{r['load_end'][0]:.2f}")
    lines += [f"  K to target / A's training time: {report['k_time_to_target_over_a']}", "",
              "Inference on the 453 held-out texts (model: K with its defaults)",
              f"{'path':<34}{'texts/s':>9}{'x pipeline':>11}{'agree fp32':>11}{'macro-F1':>9}{'peak RSS':>10}{'load 1m':>13}"]
    for tag, r in inf.items():
        agree = f"{100 * r['agreement_with_fp32']:.1f}%" if r.get("agreement_with_fp32") is not None else "-"
        lines.append(f"{r['label']:<34}{r['texts_per_second']:9.1f}{r['x_pipeline']:10.2f}x{agree:>11}"
                     f"{r['macro_f1']:9.3f}{r['peak_rss_mb'] / 1024:8.2f} GB"
                     f"{r['load_start'][0]:7.2f}->{r['load_end'][0]:.2f}")
        if r.get("fp32_share") is not None:
            lines.append(f"  ({100 * r['fp32_share']:.1f}% of the texts recomputed in fp32: int8 was unsure of them)")
    if report.get("research"):
        lines += ["", "Research: K-like step, batch 32, steady state (same batches unless the variant changes them)",
                  f"{'variant':<30}{'ex/s':>7}{'vs base':>8}{'pad %':>7}{'data':>6}{'fwd':>6}{'bwd':>6}{'opt':>6}"
                  f"{'RSS':>8}{'load 1m':>13}"]
        bases = [r["examples_per_second"] for t, r in report["research"].items()
                 if t.startswith("base") and "failed" not in r]
        base = float(np.mean(bases))
        for tag, r in report["research"].items():
            if "failed" in r:
                lines.append(f"{r['label']:<30} failed (exit code {r['failed']})")
                continue
            s = r["phases_share"]
            lines.append(f"{r['label']:<30}{r['examples_per_second']:7.1f}{r['examples_per_second'] / base:7.2f}x"
                         f"{100 * r['padding_share']:6.0f}%{100 * s['data']:5.0f}%{100 * s['forward']:5.0f}%"
                         f"{100 * s['backward']:5.0f}%{100 * s['optimizer']:5.0f}%{r['peak_rss_mb']:6.0f}MB"
                         f"{r['load_start'][0]:7.2f}->{r['load_end'][0]:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--tag")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--research", action="store_true", help="also profile K's step and measure K-like variants")
    ap.add_argument("--only", choices=["research"], help="skip the recipes (a short research run)")
    ap.add_argument("--rows", type=int, default=0, help="train rows (0: all 1,811); for quick trials only")
    ap.add_argument("--research-steps", type=int, default=25)
    ap.add_argument("--variants", default="", help="comma-separated research variants (default: all)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--freeze-row", action="store_true", help="time to quality also with frozen embeddings")
    ap.add_argument("--resume", type=Path, help="work dir of an interrupted run: reuse the results it has")
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args.tag, args.work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    REUSE["on"] = bool(args.resume)
    work = args.resume or Path(tempfile.mkdtemp(prefix="kftune-sidebyside-"))
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg(),
              "rows": args.rows or "all"}
    print(f"work dir {work}; load {report['load_start']}", flush=True)
    report["machine"] = run_child("machine", {}, work, "machine")
    report["data"] = data = run_child("prep", {"rows": args.rows}, work, "prep")
    bf16, _ = native_bf16()
    if args.only != "research":
        recipes(report, work, data, bf16, args.freeze_row)
    if args.research or args.only == "research":
        report["research"] = research(work, args, bf16)
    report["machine_end"] = run_child("machine", {}, work, "machine-end")
    report["load_end"] = os.getloadavg()
    if report.get("equal_settings"):  # shares of the larger peak measured: one slow moment must not flatter them
        report["fp32_peak_gflops"] = peak = max(report["machine"]["matmul_gflops_fp32"],
                                                report["machine_end"]["matmul_gflops_fp32"])
        for part in ("equal_settings", "time_to_quality"):
            training_rows(report[part], data, peak)
    cpu_tag = "-".join(report["machine"]["cpu"].lower().replace("(r)", "").split()[:3])
    cpu_tag += "-bf16" if bf16 else "-fp32"  # one CPU name covers machines with and without native bf16
    cpu_tag += "-isa-capped" if report["machine"].get("isa_caps") else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"sidebyside-{cpu_tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    if args.only != "research":
        print("\n" + table(report))
    elif report.get("research"):
        report.update(equal_settings={}, time_to_quality={}, inference={}, ratios={}, target_f1=float("nan"),
                      k_time_to_target_over_a=None)
        print("\n" + table(report).split("Research:", 1)[-1])
    print(f"\nwrote {out}")


def recipes(report: dict, work: Path, data: dict, bf16: bool, freeze_row: bool) -> None:
    eq_k = [f"finetune.learning_rate={EQUAL['learning_rate']}", f"finetune.epochs={EQUAL['epochs']}",
            f"finetune.batch_size={EQUAL['batch_size']}"]
    print("equal settings", flush=True)
    eq = {"A": {"label": "A seeds' loop (pad 128, constant lr)", **run_child("seeds_loop", EQUAL, work, "A")},
          "B": {"label": "B HF Trainer, group_by_length", **run_child(
              "trainer", {"tag": "B", "args": {"learning_rate": EQUAL["learning_rate"], "num_train_epochs": 1,
                                               "per_device_train_batch_size": 16}}, work, "B")},
          "K": {"label": "K kftune step (defaults for CPU)",
                **run_child("kftune_step", {"out": "model-K", "overrides": eq_k}, work, "K")}}
    if bf16:  # K in fp32 too, the precision A runs in
        eq["K-fp32"] = {"label": "K kftune step, bf16=false",
                        **run_child("kftune_step", {"out": "model-K-fp32", "overrides": [*eq_k, "finetune.bf16=false"]},
                                    work, "K-fp32")}
    peak = report["machine"]["matmul_gflops_fp32"]
    training_rows(eq, data, peak)
    report["equal_settings"] = eq
    rate = {t: r["examples_per_second"] for t, r in eq.items()}
    report["ratios"] = {"K/A examples/s": rate["K"] / rate["A"], "K/B examples/s": rate["K"] / rate["B"]}
    if "K-fp32" in rate:
        report["ratios"].update({"K-fp32/A": rate["K-fp32"] / rate["A"], "K-fp32/B": rate["K-fp32"] / rate["B"]})

    print("time to quality (own defaults)", flush=True)
    target = eq["A"]["macro_f1"]
    ttq = {"A": {"label": "A: lr 2e-5 constant, 1 epoch, batch 16 (=equal run)", **eq["A"]},
           "B": {"label": "B: TrainingArguments defaults (lr 5e-5, 3 ep, b 8)", **run_child(
               "trainer", {"tag": "B-defaults", "eval_every_steps": 40}, work, "B-defaults")},  # 40 x 8 = K's 10 x 32
           "K": {"label": "K: params.yaml (lr 1e-4, 3 ep, b 32, wu 10%)", **run_child(
               "kftune_step", {"out": "model-K-defaults",
                               "overrides": ["finetune.eval_every_steps=10", "finetune.early_stopping_patience=0"]},
               work, "K-defaults")}}
    if freeze_row:  # what freezing the embeddings (half of MiniLM's parameters) costs in quality
        ttq["K-freeze-emb"] = {"label": "K: params.yaml + freeze_embeddings=true", **run_child(
            "kftune_step", {"out": "model-K-freeze", "overrides": ["finetune.eval_every_steps=10",
                                                                  "finetune.early_stopping_patience=0",
                                                                  "finetune.freeze_embeddings=true"]},
            work, "K-freeze-emb")}
    training_rows(ttq, data, peak)
    for r in ttq.values():
        r["seconds_to_target"] = time_to(r["points"], target)
    report["time_to_quality"], report["target_f1"] = ttq, target
    k_to = ttq["K"]["seconds_to_target"]
    report["k_time_to_target_over_a"] = None if k_to is None else k_to / eq["A"]["train_seconds"]

    print("inference", flush=True)
    paths = {"pipeline": ("pipeline('text-classification')", {"kind": "pipeline"}),
             "pipeline-b64": ("pipeline, batch_size=64", {"kind": "pipeline", "batch_size": 64}),
             "sorted-fp32": ("sorted fp32 loop (batch 64)", {"kind": "sorted-fp32"}),
             "kftune-fp32": ("kftune predict fp32", {"kind": "kftune", "precision": "fp32"}),
             "kftune-bf16": (f"kftune predict bf16 ({'native' if bf16 else 'emulated'})",
                             {"kind": "kftune", "precision": "bf16"}),
             "kftune-int8": ("kftune predict int8 (as served)", {"kind": "kftune", "precision": "int8"})}
    inf = {t: {"label": label, **run_child("infer", {**spec, "tag": t, "model": "model-K-defaults"}, work, f"infer-{t}")}
           for t, (label, spec) in paths.items()}
    ref = np.array(json.loads((work / "preds-kftune-fp32.json").read_text()))
    for t, r in inf.items():
        r["agreement_with_fp32"] = float((np.array(json.loads((work / f"preds-{t}.json").read_text())) == ref).mean())
        r["x_pipeline"] = r["texts_per_second"] / inf["pipeline"]["texts_per_second"]
        r["real_tokens_per_second"] = data["test_tokens"] / r["seconds"]
    report["inference"] = inf


VARIANTS = {  # tag: (label, spec changes from the base: K's step at its defaults for this CPU)
    "base": ("K step (sdpa, bf16 native, 2 thr)", {}),
    "fp32": ("  fp32", {"precision": "fp32"}),
    "eager": ("  eager attention", {"attn": "eager"}),
    "epoch-sorted": ("  buckets: whole-epoch sort", {"batching": "epoch-sorted"}),
    "pad16": ("  pad to multiple of 16", {"pad_multiple": 16}),
    "pack": ("  packed rows of 128, no pad", {"pack": True, "batching": "random"}),
    "threads1": ("  1 thread", {"threads": 1}),
    "affinity": ("  OMP_PROC_BIND=close", {"env": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}}),
    "passive": ("  OMP_WAIT_POLICY=passive", {"env": {"OMP_WAIT_POLICY": "passive"}}),
    "threads1-affinity": ("  1 thread, OMP_PROC_BIND=close", {"threads": 1, "env": {"OMP_PROC_BIND": "close",
                                                                                    "OMP_PLACES": "cores"}}),
    "fused-adamw": ("  fused AdamW", {"fused": True}),
    "freeze-emb": ("  freeze embeddings", {"freeze_embeddings": True}),
    "fused-freeze": ("  fused AdamW + freeze emb.", {"fused": True, "freeze_embeddings": True}),
    "attn-dropout0": ("  attention dropout 0 (SDPA's fused CPU kernel)", {"attn_dropout": 0.0}),
    "compile": ("  torch.compile", {"compile": True}),
    "compile-dyn": ("  torch.compile dynamic=True", {"compile": True, "dynamic": True}),
    "compile-pad16": ("  torch.compile, pad to x16", {"compile": True, "pad_multiple": 16}),
    "profile": ("  (torch.profiler, 4 steps)", {}),
}


def research(work: Path, args, bf16: bool) -> dict:
    print("research: K-like step variants", flush=True)
    chosen = [v for v in (args.variants.split(",") if args.variants else VARIANTS) if v]
    out = {}
    order = [v for v in chosen if v not in ("base", "profile")]
    # the base again after every few variants: the machine's load drifts, compare with the nearest base
    plan = ["base", *[t for i, v in enumerate(order) for t in ([v, f"base#{i // 4 + 2}"] if i % 4 == 3 else [v])]]
    if not plan[-1].startswith("base#"):
        plan.append(f"base#{len(order) // 4 + 2}")
    plan.append("profile")
    out = {}
    for tag in plan:
        label, changes = VARIANTS[tag.split("#")[0]]
        spec = {"batch_size": 32, "precision": "bf16" if bf16 else "fp32", "warmup_steps": 3,
                "steps": args.research_steps, **changes}
        if tag.startswith("compile"):
            spec["warmup_steps"] = 12  # compile and the first recompiles for new lengths happen here
        if tag == "profile":
            spec.update(steps=4, profile_steps=4)
        env = spec.pop("env", None)
        res = run_child("k_like", spec, work, f"research-{tag}", env, fatal=False)
        out[tag] = {"label": label if "#" not in tag else f"K step again ({tag})", "spec": spec, **res}
    return out


if __name__ == "__main__":
    main()
