"""A MiniLM-L6 sentiment classifier on Financial PhraseBank (all-agree) for the serving benchmarks.

Fine-tuned for a few steps (the benchmarks measure speed and agreement, which need a real classifier,
not a good one) through the real steps, and kept in a work folder so the second benchmark reuses it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from kftune.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PHRASEBANK = ROOT.parent / "shared" / "data" / "financial_phrasebank" / "sentences_allagree.csv"
NAME = "phrasebank-minilm"


def params(work: Path, steps: int):
    return load_params(ROOT / "params.yaml", [
        "model.name=minilm-l6", f"finetune.max_steps={steps}", "finetune.batch_size=16", "finetune.eval_every_steps=0",
        "finetune.checkpoint_every_steps=0", "finetune.learning_rate=1e-4", "finetune.early_stopping_patience=0",
        f"register.model_name={NAME}", "register.experiment=bench-serving"])


def prepare(work: Path, steps: int = 60) -> tuple[Path, list[str]]:
    """The fine-tuned model folder and the PhraseBank test texts (the hash split's test rows)."""
    from kftune.steps.evaluate import evaluate
    from kftune.steps.finetune import finetune
    from kftune.steps.ingest import ingest
    from kftune.steps.tokenize import tokenize

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not PHRASEBANK.exists():
        raise SystemExit(f"{PHRASEBANK} is absent (../shared/data ships with CI, not with the repo)")
    p = params(work, steps)
    if not (work / "eval" / "metrics.json").exists():
        t0 = time.perf_counter()
        ingest(str(PHRASEBANK), work / "data", p.ingest)
        tokenize(work / "data", work / "tok", p.model.name, p.tokenize)
        finetune(work / "tok", work / "model", p.model.name, p.finetune)
        evaluate(work / "data", work / "model", work / "eval", p.evaluate)
        print(f"fine-tuned {p.model.name} for {steps} steps on PhraseBank in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return work / "model", pd.read_parquet(work / "data" / "test.parquet")["text"].tolist()


def register_versions(work: Path, steps: int = 60, versions: int = 2) -> str:
    """Register the fine-tuned model `versions` times (v1 champion) in an MLflow store in `work`; return the URI."""
    from kftune import registry
    from kftune.steps.register import register
    from kftune.tracking import configure

    prepare(work, steps)
    os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{work / 'mlflow.db'}"
    configure(work)
    if registry.version_by_alias(NAME, registry.CHAMPION) is None:
        p = params(work, steps)
        for i in range(versions):
            d = register(work / "data", work / "model", work / "eval", work / f"gate-{i}", p)
            if i == 0:
                registry.promote(NAME, d.version, "serving benchmark")
    return uri


def machine_line() -> str:
    from kftune.serving.model import machine

    return f"{machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
