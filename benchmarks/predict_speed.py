"""Prediction speed per precision vs the Hugging Face pipeline, and agreement with fp32.

MiniLM-L6 fine-tuned briefly on Financial PhraseBank (all-agree), predicting the test split's texts:
`pipeline("text-classification")` as people call it (one text at a time) and with batch_size=32, then
kftune's predictor at fp32, bf16 (only where the CPU has native bf16) and int8 (as served: smoothed, per-channel
dynamic quantisation of the Linear layers, fp32 for the texts it is unsure of; serve.int8_*), measured as
registration measures it for `serve.precision: auto`, which is how `kftune predict` and `kftune serve` run it
(packed rows where they give padded batches' answers, else length-sorted padded batches:
kftune.predict.choose_batching). Prints texts/s, the speed-up over the plain pipeline and the share of
labels equal to fp32's; no timed assertions.

    .venv/bin/python benchmarks/predict_speed.py [--work .kftune/bench-serving] [--steps 60]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from serving_model import machine_line, params, prepare  # benchmarks/ is on sys.path when run as a script


def pipeline_speed(model_dir: Path, texts: list[str], batch_size: int | None) -> tuple[float, list[str]]:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(model_dir), tokenizer=str(model_dir), device="cpu")
    kwargs = {"batch_size": batch_size} if batch_size else {}
    pipe(texts[:8], **kwargs)  # warm-up
    t0 = time.perf_counter()
    out = pipe(texts, truncation=True, **kwargs)
    return len(texts) / (time.perf_counter() - t0), [o["label"] for o in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=".kftune/bench-serving")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kftune.hardware import apply_threads
    from kftune.serving.model import int8_recipe, split_texts
    from kftune.serving.precision import candidates, measure_precisions
    from kftune.steps.resolve import reference_rows

    model_dir, texts = prepare(Path(args.work), args.steps)
    apply_threads(0)
    print(f"machine: {machine_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"data: {len(texts)} Financial PhraseBank test texts; model: minilm-l6 fine-tuned {args.steps} steps\n")

    plain, labels_plain = pipeline_speed(model_dir, texts, None)
    batched, _ = pipeline_speed(model_dir, texts, args.batch_size)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    todo, skipped = candidates("cpu")
    cfg = params(Path(args.work), args.steps).serve
    calibration = split_texts(reference_rows(Path(args.work) / "data"), 0, cfg.int8_calibration_rows)[1]
    measured = measure_precisions(model, tokenizer, texts, "sequence-classification", todo, args.batch_size,
                                  int8_recipe(cfg, tokenizer, calibration))

    print(f"{'predictor':<40} {'texts/s':>9} {'vs pipeline':>12} {'agreement':>10}")
    print(f"{'HF pipeline (one text at a time)':<40} {plain:>9.1f} {1:>11.2f}x {'':>10}")
    print(f"{f'HF pipeline batch_size={args.batch_size}':<40} {batched:>9.1f} {batched / plain:>11.2f}x {'':>10}")
    for p, m in measured.items():
        name = f"kftune {p} ({m['batching']}, batch {args.batch_size})"
        print(f"{name:<40} {m['texts_per_s']:>9.1f} {m['texts_per_s'] / plain:>11.2f}x {m['agreement']:>10.4f}"
              + (f"  ({100 * m['fp32_share']:.1f}% recomputed in fp32)" if "fp32_share" in m else ""))
    for s in skipped:
        print(f"not measured: {s}")
    print(f"\nmachine after: {machine_line()}")


if __name__ == "__main__":
    main()
