"""LoRA (finetune.method=lora) through peft: wrap the base model for training, save the adapter beside the
merged model, and load any registered version (full or adapter) as one plain transformers model.

A LoRA version in the registry holds only the adapter (the low-rank matrices and the new classifier head)
and the tokenizer; MLflow records the path of a local base folder and loads the base from it (mlflow's
`base_model_path`). That folder is the base model's weights (linked, not copied) under a config that
carries this version's labels, so the base loads with a head of the right size for the adapter's head.
Everything that predicts gets the adapter merged into the weights: one model, no peft layer at serving time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ADAPTER = "adapter"  # the fine-tune output's subfolder holding the peft adapter (LoRA runs only)
BASES = Path(os.environ.get("KFTUNE_LORA_BASES", Path.home() / ".cache" / "kftune" / "lora-bases"))
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def wrap(model, r: int, alpha: int, dropout: float, ner: bool):
    """The model with LoRA on the attention query and value projections (peft's default for BERT); the
    adapters and the head train. The head includes BERT's pooler: a base saved without one (a masked-LM or
    sentence-embedding checkpoint) gets a random pooler at every load, so it must live in the adapter."""
    from peft import LoraConfig, TaskType, get_peft_model

    from kftune.config import ConfigError

    config = LoraConfig(task_type=TaskType.TOKEN_CLS if ner else TaskType.SEQ_CLS, r=r, lora_alpha=alpha,
                        lora_dropout=dropout, modules_to_save=["classifier"] if ner else ["classifier", "pooler"])
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft names no default attention projections for this architecture
        if "target_modules" not in str(exc):
            raise
        raise ConfigError(f"finetune.method=lora: peft has no default LoRA target modules for model type "
                          f"{model.config.model_type!r} (BERT-family models have them); use finetune.method=full "
                          f"for this base model") from None


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged(model):
    """A plain transformers model: a peft model's adapters merged into its weights; any other model as is."""
    return model.merge_and_unload() if is_peft(model) else model


_DIGESTS: dict = {}  # (file, size, mtime) of each weight file -> digest: a server loads a version many times


def weights_digest(folder: str | Path) -> str:
    """sha256 over a model folder's weight files, links followed ("" where it has none): what a LoRA version's
    base must still be when the version loads, since MLflow records the base by path only."""
    files = [Path(folder, name).resolve() for name in WEIGHT_FILES if Path(folder, name).is_file()]
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        for name, f in zip([n for n in WEIGHT_FILES if Path(folder, n).is_file()], files):
            digest.update(name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest() if files else ""
    return _DIGESTS[key]


def base_folder(base_path: str | Path, model_config) -> Path:
    """A folder `from_pretrained` loads as the base model with this fine-tune's head config (labels).

    The weights are symlinks to the base model's files, so each label set costs a few KB on disk.
    """
    base_path = Path(base_path).resolve()
    config = model_config.to_dict()
    key = hashlib.sha256(json.dumps([str(base_path), config], sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = BASES / key
    if (folder / "config.json").exists():
        return folder
    tmp = BASES / f".{key}.{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in WEIGHT_FILES:
        if (base_path / name).exists() and not (tmp / name).exists():
            (tmp / name).symlink_to(base_path / name)
    model_config.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def adapter_pipeline(model_dir: str | Path, hf_task: str):
    """A LoRA fine-tune's registrable form: (transformers pipeline over base + adapter, base folder), or None
    for a full fine-tune, and for LoRA on a warm-started champion (its base is a run's temporary export, so
    that version is registered merged, in full)."""
    import transformers
    from peft import PeftModel

    from kftune.base_models import resolve_base_model
    from kftune.fileio import read_json
    from kftune.predict import MODEL_INFO

    model_dir = Path(model_dir)
    if not (model_dir / ADAPTER).is_dir():
        return None
    base = Path(resolve_base_model(read_json(model_dir / MODEL_INFO)["base_model"]))
    if (base / MODEL_INFO).exists() or not base.is_dir():
        return None
    auto = (transformers.AutoModelForTokenClassification if hf_task == "token-classification"
            else transformers.AutoModelForSequenceClassification)
    folder = base_folder(base, transformers.AutoConfig.from_pretrained(model_dir))
    model = PeftModel.from_pretrained(auto.from_pretrained(folder), model_dir / ADAPTER)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return transformers.pipeline(hf_task, model=model, tokenizer=tokenizer, device="cpu"), str(folder)
