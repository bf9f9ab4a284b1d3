"""Drift step speed: every drift test on N reference vs N new texts (target: 5,000 vs 5,000 in < 60 s).

The texts are demo batches (reference: i.i.d., new: fully shifted). The encoder is the base
model with a fresh classification head: a fine-tuned champion costs exactly the same to run.
Prints the wall time, texts/s, and the time of the MMD permutation test alone (re-run on the same
embeddings); the rest is encoding both sides with the model.

    .venv/bin/python benchmarks/drift_speed.py [--model minilm-l6] [--rows 5000] [--threads 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from kftune.config import load_params
from kftune.demo.data import generate
from kftune.drift_tests import mmd_test
from kftune.steps.drift import run_checks
from kftune.tables import split_of

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps the default")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kftune.base_models import resolve_base_model

    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml", [f"model.name={args.model}"])
    cfg = dataclasses.replace(params.drift, max_rows=args.rows)
    folder = Path(tempfile.mkdtemp(prefix="kftune-drift-bench-"))
    path = resolve_base_model(args.model)
    labels = ["negative", "neutral", "positive"]
    torch.manual_seed(0)  # the fresh head's weights
    AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=3, id2label=dict(enumerate(labels)), label2id={lbl: i for i, lbl in enumerate(labels)}
    ).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = params.tokenize.max_length
    tok.save_pretrained(folder)

    # reference: held-out rows (the drift step reads validation/test rows as the reference side)
    reference = generate(0, args.rows, drift=0.0).assign(split="test")
    train = generate(1, args.rows, drift=0.0).assign(split="train")  # the champion's vocabulary
    new = generate(2, args.rows, drift=1.0)
    new["split"] = [split_of(t, "x", 0.1, 0.15) for t in new["text"]]
    import pandas as pd

    t0 = time.perf_counter()
    checks, sides = run_checks(folder, pd.concat([reference, train]), new, cfg)
    total = time.perf_counter() - t0
    texts = len(reference) + len(new)
    print(f"drift step, {args.model}, {len(reference)} reference vs {len(new)} new texts, "
          f"{torch.get_num_threads()} threads, {cfg.permutations} MMD permutations: {total:.1f} s "
          f"({texts / total:.0f} texts/s)")
    t0 = time.perf_counter()
    mmd_test(sides["reference"]["emb"], sides["new"]["emb"], cfg.permutations, cfg.alpha, cfg.seed)
    print(f"  of which the MMD permutation test: {time.perf_counter() - t0:.1f} s")
    for name, c in checks.items():
        p = "" if c.p_value is None else f" p={c.p_value:.3g}"
        print(f"  {name:<11} score {c.score:.4f}{p} drift={c.verdict}")


if __name__ == "__main__":
    main()
