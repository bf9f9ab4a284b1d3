"""Fine-tune throughput and accuracy: length grouping and bf16 autocast on vs off.

Prints one line per variant: train examples/s, wall seconds and test macro-F1, so a speed-up is
always judged together with the accuracy it costs. Uses Financial PhraseBank (all-agree) from
../shared/data when present, else a demo batch.

    .venv/bin/python benchmarks/finetune_speed.py [--model minilm-l6] [--epochs 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kftune.config import load_params
from kftune.demo.data import write_batch
from kftune.steps.evaluate import evaluate
from kftune.steps.finetune import finetune
from kftune.steps.ingest import ingest
from kftune.steps.tokenize import tokenize

ROOT = Path(__file__).resolve().parents[1]
PHRASEBANK = ROOT.parent / "shared" / "data" / "financial_phrasebank" / "sentences_allagree.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", default="1e-4")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kftune-bench-"))
    source = PHRASEBANK if PHRASEBANK.exists() else write_batch(tmp, 0, 3000)
    base = load_params(ROOT / "params.yaml", [f"model.name={args.model}", f"finetune.epochs={args.epochs}",
                                              f"finetune.learning_rate={args.lr}", "finetune.early_stopping_patience=0"])
    ingest(str(source), tmp / "data", base.ingest)
    tokenize(tmp / "data", tmp / "tok", base.model.name, base.tokenize)
    print(f"data: {source.name}, model: {args.model}, epochs: {args.epochs}, lr: {args.lr}", flush=True)
    for grouped in (False, True):
        for bf16 in (False, True):
            p = load_params(ROOT / "params.yaml", [f"model.name={args.model}", f"finetune.epochs={args.epochs}",
                                                   f"finetune.learning_rate={args.lr}",
                                                   "finetune.early_stopping_patience=0",
                                                   f"finetune.group_by_length={str(grouped).lower()}",
                                                   f"finetune.bf16={str(bf16).lower()}"])
            t0 = time.perf_counter()
            s = finetune(tmp / "tok", tmp / "model", p.model.name, p.finetune)
            wall = time.perf_counter() - t0
            f1 = evaluate(tmp / "data", tmp / "model", tmp / "eval", p.evaluate)["model"]["macro_f1"]
            print(f"group_by_length={grouped!s:<5} bf16={bf16!s:<5} {s['examples_per_second']:7.1f} examples/s "
                  f"{wall:6.1f} s  test macro-F1 {f1:.4f}", flush=True)


if __name__ == "__main__":
    main()
