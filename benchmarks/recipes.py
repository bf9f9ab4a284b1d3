"""kftune's recipe against a careful hand-written one, and LoRA against full fine-tuning, on held-out data.

MiniLM-L6, one CPU. Three tasks from ../shared/data, each with a train, a validation and a test file that
every recipe sees the same way (kftune through its given-splits ingest):

- fpb: Financial PhraseBank all-agree; test = the stratified 20% (`random_state=0`, sidebyside's 453 rows),
  validation = a stratified 10% of the rest, train = the other 1,630 rows; macro-F1.
- sst2: 20,000 rows sampled from sst2/train.tsv (`random_state=0`), 10% of them validation; test =
  sst2/validation.tsv (6,735 rows, never trained or selected on); accuracy and macro-F1.
- wnut17: wnut17train.conll / emerging.dev.conll / emerging.test.annotated as published; entity F1 (seqeval,
  strict IOB2).

Recipes (each in its own process, so each peak RSS is its own):

- H: a careful hand-written PyTorch loop, the BERT fine-tuning recipe: AdamW (weight decay 0.01, none on
  biases and LayerNorm), linear warm-up over 10% then linear decay, batch 32, 3 epochs, gradient clipping at
  1.0, dynamic padding, shuffled batches, the best epoch on validation kept; bf16 autocast only where the CPU
  computes it natively (the rule kftune uses, so both run at the same precision). Learning rates --h-lrs.
- K: kftune's own steps (ingest -> tokenize -> fine-tune) at params.yaml's defaults.
- K ...: K with other settings (--k-runs), such as the default's neighbouring learning rates or another seed.
- K lora (fpb, sst2): `finetune.method=lora` at --lora-lrs (`finetune.lora_learning_rate`).

Every model is scored on the test file by `kftune score`'s own function. Training time excludes validation
for both H and K. The table and a JSON (benchmarks/results/recipes-<cpu>.json) hold validation and test
numbers, train seconds, examples/s and peak RSS of every run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recipes.py [--tasks fpb,sst2,wnut17]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODEL = "minilm-l6"
SEED = 42
TASKS = {"fpb": "sequence-classification", "sst2": "sequence-classification", "wnut17": "token-classification"}


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")


def cpu_tag(cpu: str) -> str:
    """sidebyside's file tag: the CPU's first three words, and whether it computes bf16 natively."""
    native = "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    return "-".join(cpu.lower().replace("(r)", "").split()[:3]) + ("-bf16" if native else "-fp32")


def prepare(task: str, work: Path) -> dict[str, str]:
    """The task's train/validation/test files under work/task (written once)."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    if task == "wnut17":
        folder = DATA / "wnut17"
        return {"train": str(folder / "wnut17train.conll"), "validation": str(folder / "emerging.dev.conll"),
                "test": str(folder / "emerging.test.annotated")}
    out = work / task
    out.mkdir(parents=True, exist_ok=True)
    files = {s: str(out / f"{s}.csv") for s in ("train", "validation", "test")}
    if task == "fpb":
        df = pd.read_csv(DATA / "financial_phrasebank" / "sentences_allagree.csv")
        rest, test = train_test_split(df, test_size=0.2, stratify=df["label"], random_state=0)
        train, val = train_test_split(rest, test_size=0.1, stratify=rest["label"], random_state=0)
    else:
        df = pd.read_csv(DATA / "sst2" / "train.tsv", sep="\t").rename(columns={"sentence": "text"})
        train, val = train_test_split(df.sample(20_000, random_state=0), test_size=0.1, random_state=0)
        test = pd.read_csv(DATA / "sst2" / "validation.tsv", sep="\t").rename(columns={"sentence": "text"})
    for name, part in (("train", train), ("validation", val), ("test", test)):
        part[["text", "label"]].to_csv(files[name], index=False)
    return files


def params_for(task: str, overrides: list[str]):
    from kftune.config import load_params

    return load_params(ROOT / "params.yaml", [f"task={task}", f"model.name={MODEL}",
                                              "finetune.checkpoint_every_steps=0", *overrides])


# ---------------------------------------------------------------- children

def kftune_recipe(spec: dict, work: Path) -> dict:
    """K: kftune's ingest (given splits), tokenize and fine-tune steps; the model lands in spec['out']."""
    from kftune.steps.finetune import finetune
    from kftune.steps.ingest import ingest
    from kftune.steps.tokenize import tokenize

    params = params_for(TASKS[spec["task"]], spec["overrides"])
    run = work / spec["tag"]
    ingest(None, run / "data", params.ingest, task=params.task, split_files=spec["files"])
    tokenize(run / "data", run / "tok", MODEL, params.tokenize)
    summary = finetune(run / "tok", run / "model", MODEL, params.finetune)
    history = json.loads((run / "model" / "training_history.json").read_text())
    key = "val_entity_f1" if params.task == "token-classification" else "val_macro_f1"
    return {"model": str(run / "model"), "train_seconds": summary["train_seconds"],
            "examples_per_second": summary["examples_per_second"], "precision": summary.get("precision"),
            "validation": [h[key] for h in history if key in h], "epochs_completed": summary.get("epochs_completed"),
            "stopped_early": summary.get("stopped_early"), "seed": summary.get("seed"),
            "collapsed_runs": summary.get("collapsed_runs"),
            "settings": {k: getattr(params.finetune, k) for k in ("method", "learning_rate", "epochs", "batch_size",
                                                                  "warmup_ratio", "early_stopping_patience")}}


def handwritten(spec: dict, work: Path) -> dict:
    """H: the hand-written recipe (see the module docstring); the best epoch's model lands in spec['out']."""
    import copy

    import numpy as np
    import pandas as pd
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              get_linear_schedule_with_warmup, set_seed)

    from kftune.base_models import resolve_base_model
    from kftune.hardware import choose_bf16, cpu_flags
    from kftune.metrics import entity_metrics, macro_f1
    from kftune.predict import predict_proba_with, word_predictions
    from kftune.tables import read_sentences

    files, ner, lr = spec["files"], spec["task"] == "wnut17", spec["learning_rate"]
    epochs, batch_size, max_length = 3, 32, 128
    set_seed(SEED)
    bf16 = bool(choose_bf16("auto", "cpu", False, cpu_flags()).value)
    base = resolve_base_model(MODEL)
    tok = AutoTokenizer.from_pretrained(base)
    if ner:
        cfg = params_for("token-classification", []).ingest
        parts = {s: read_sentences(f, cfg)[0] for s, f in files.items()}
        labels = sorted({t for tags in parts["train"]["tags"] for t in tags}, key=lambda t: (t != "O", t[2:], t))
        enc = tok([list(w) for w in parts["train"]["tokens"]], is_split_into_words=True, truncation=True,
                  max_length=max_length)
        rows = []
        for i, tags in enumerate(parts["train"]["tags"]):
            previous, y = None, []
            for w in enc.word_ids(i):  # the label on each word's first sub-token, -100 elsewhere
                y.append(-100 if w is None or w == previous else labels.index(tags[w]))
                previous = w
            rows.append((enc["input_ids"][i], y))
        model_cls = AutoModelForTokenClassification
    else:
        parts = {s: pd.read_csv(f) for s, f in files.items()}
        labels = sorted(parts["train"]["label"].astype(str).unique())
        enc = tok(parts["train"]["text"].tolist(), truncation=True, max_length=max_length)
        rows = list(zip(enc["input_ids"], [labels.index(str(v)) for v in parts["train"]["label"]]))
        model_cls = AutoModelForSequenceClassification
    model = model_cls.from_pretrained(base, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                      label2id={lbl: i for i, lbl in enumerate(labels)})
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
    steps = epochs * -(-len(rows) // batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)

    def validate() -> float:
        model.eval()
        if ner:
            pred, _ = word_predictions(model, tok, [list(w) for w in parts["validation"]["tokens"]], 64, bf16)
            score = entity_metrics([list(t) for t in parts["validation"]["tags"]], pred)["entity_f1"]
        else:
            probs = predict_proba_with(model, tok, parts["validation"]["text"].tolist(), 64, bf16)
            y = [labels.index(str(v)) for v in parts["validation"]["label"]]
            score = macro_f1(np.array(y), probs.argmax(1), len(labels))
        model.train()
        return score

    rng, train_s, scores, best = np.random.default_rng(SEED), 0.0, [], None
    model.train()
    for _ in range(epochs):
        t = time.perf_counter()
        order = rng.permutation(len(rows))
        for s in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[s: s + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in batch])
            mask = (ids != tok.pad_token_id).long()
            y = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch] if ner else [y for _, y in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, attention_mask=mask, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t
        scores.append(validate())
        if scores[-1] == max(scores):
            best = copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    out = work / spec["tag"] / "model"
    model.save_pretrained(out)
    tok.model_max_length = max_length
    tok.save_pretrained(out)
    return {"model": str(out), "train_seconds": train_s, "examples_per_second": epochs * len(rows) / train_s,
            "precision": "bf16" if bf16 else "fp32", "validation": scores,
            "settings": {"learning_rate": lr, "epochs": epochs, "batch_size": batch_size, "warmup_ratio": 0.1}}


def score(spec: dict, work: Path) -> dict:
    """A trained folder on the task's test file, by kftune score's own metric code."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from kftune.score import score_sentences, score_texts

    ner = spec["task"] == "wnut17"
    params = params_for(TASKS[spec["task"]], [])
    cls = AutoModelForTokenClassification if ner else AutoModelForSequenceClassification
    model, tok = cls.from_pretrained(spec["model"]).eval(), AutoTokenizer.from_pretrained(spec["model"])
    result = (score_sentences if ner else score_texts)(model, tok, spec["test"], params, spec["model"])
    m = result["metrics"]
    return {"rows": result["rows"], **{k: m[k] for k in ("macro_f1", "accuracy", "entity_f1") if k in m}}


CHILDREN = {f.__name__: f for f in (kftune_recipe, handwritten, score)}


def run_child(name: str, spec: dict, work: Path) -> dict:
    spec_file = work / f"spec-{spec['tag']}-{name}.json"
    spec_file.write_text(json.dumps(spec))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--spec", str(spec_file)],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{spec['tag']} ({name}) failed with exit code {proc.returncode}")
    result = json.loads(spec_file.with_suffix(".result").read_text())
    result["process_seconds"] = time.perf_counter() - t
    return result


def child_main(name: str, spec_file: Path) -> None:
    spec = json.loads(spec_file.read_text())
    load = os.getloadavg()
    result = CHILDREN[name](spec, spec_file.parent)
    result.update(load_start=load, load_end=os.getloadavg(),
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    spec_file.with_suffix(".result").write_text(json.dumps(result, default=float))


# ---------------------------------------------------------------- the run

def plan(task: str, args) -> list[tuple[str, str, dict]]:
    """(tag, child, spec) of every recipe run on one task."""
    runs = [(f"H lr={lr:g}", "handwritten", {"learning_rate": lr}) for lr in args.h_lrs]
    runs.append(("K (params.yaml)", "kftune_recipe", {"overrides": []}))
    for run in args.k_runs:  # "finetune.learning_rate=5e-5,finetune.seed=43" -> tag "K learning_rate=5e-5 seed=43"
        overrides = [o for o in run.split(",") if o]
        runs.append(("K " + " ".join(o.split(".", 1)[-1] for o in overrides), "kftune_recipe", {"overrides": overrides}))
    if TASKS[task] == "sequence-classification":
        runs += [(f"K lora lr={lr:g}", "kftune_recipe",
                  {"overrides": ["finetune.method=lora", f"finetune.lora_learning_rate={lr}"]}) for lr in args.lora_lrs]
    return runs


def table(results: dict) -> str:
    lines = [f"{'task':<7} {'recipe':<28} {'prec':<5} {'train s':>8} {'ex/s':>7} {'val (per epoch)':<24} "
             f"{'test':>7} {'test F1':>8} {'RSS MB':>7}"]
    for task, runs in results.items():
        for tag, r in runs.items():
            test = r["test"]
            headline = test.get("accuracy", test.get("entity_f1"))
            f1 = test.get("macro_f1", test.get("entity_f1"))
            val = " ".join(f"{v:.3f}" for v in r["validation"])
            lines.append(f"{task:<7} {tag:<28} {r['precision']:<5} {r['train_seconds']:>8.1f} "
                         f"{r['examples_per_second']:>7.1f} {val:<24} {headline:>7.3f} {f1:>8.3f} "
                         f"{r['peak_rss_mb']:>7.0f}")
    lines.append("test: accuracy (wnut17: entity F1); test F1: macro-F1 (wnut17: entity F1)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--spec", type=Path)
    ap.add_argument("--tasks", default="fpb,sst2,wnut17")
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    ap.add_argument("--h-lrs", type=floats, default=[2e-5, 5e-5], help="the hand-written recipe's learning rates")
    ap.add_argument("--k-runs", type=lambda s: [r for r in s.split(";") if r], default=[],
                    help="kftune with these overrides too: runs separated by ';', a run's overrides by ','")
    ap.add_argument("--lora-lrs", type=floats, default=[1e-4, 1e-3], help="kftune LoRA at these learning rates")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args.spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="kftune-recipes-"))
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_model(), "cores": os.cpu_count(),
              "model": MODEL,
              "load_start": os.getloadavg(), "results": {}}
    out = args.out or ROOT / "benchmarks" / "results" / f"recipes-{cpu_tag(report['cpu'])}.json"
    if out.exists():  # a later run on the same CPU adds its recipes (or replaces those with the same tag)
        old = json.loads(out.read_text())
        report["results"], report["runs"] = old["results"], old.get("runs", [old["started"]])
    report.setdefault("runs", []).append(report["started"])
    print(f"work dir {work}; {report['cpu']}; load {report['load_start']}", flush=True)
    for task in args.tasks.split(","):
        files = prepare(task, work)
        runs = report["results"].setdefault(task, {})
        for tag, name, extra in plan(task, args):
            slug = f"{task}-{tag.replace(' ', '_').replace('=', '').replace('(', '').replace(')', '')}"
            r = run_child(name, {"tag": slug, "task": task, "files": files, **extra}, work)
            r["test"] = run_child("score", {"tag": slug, "task": task, "model": r["model"], "test": files["test"]}, work)
            runs[tag] = r
            scores = "  ".join(f"{k} {r['test'][k]:.3f}" for k in ("accuracy", "macro_f1", "entity_f1") if k in r["test"])
            print(f"  {task:<7} {tag:<17} train {r['train_seconds']:6.1f} s  val {max(r['validation']):.3f}  "
                  f"test {scores}  RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    report["load_end"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print("\n" + table(report["results"]) + f"\n\nwrote {out}")


if __name__ == "__main__":
    main()
