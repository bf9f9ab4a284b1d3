from pathlib import Path

import pytest
from transformers import AutoConfig

from kftune.base_models import ModelNotFound, load_pretrained, resolve_base_model


@pytest.mark.parametrize("name, hidden", [("minilm-l6", 384), ("bert-tiny", 128)])
def test_packaged_models_resolve_offline(name, hidden):
    path = Path(resolve_base_model(name))
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert AutoConfig.from_pretrained(path).hidden_size == hidden


def test_local_folder_is_accepted(tiny_model):
    assert resolve_base_model(tiny_model) == str(Path(tiny_model).resolve())


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_base_model(str(tmp_path))


def test_unreachable_hub_id_says_so_plainly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = resolve_base_model("nobody/no-such-model")
    with pytest.raises(ModelNotFound, match="Hugging Face hub failed"):
        load_pretrained(AutoConfig, name)
