"""int8 inference: smoothing keeps each layer's function and cuts its quantisation error; the fp32 fallback
recomputes exactly the texts int8 is unsure of; calibration and agreement texts come from different rows."""

import pandas as pd
import pytest

from kftune.config import ConfigError, load_params
from kftune.serving.model import split_texts
from tests.conftest import ROOT


def _outlier_layer():
    """A Linear layer and inputs whose channels 3 and 17 are 30x the others, as in a BERT's LayerNorm outputs."""
    import torch

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(512, 64)
    x[:, [3, 17]] *= 30
    return layer, x


def test_smoothing_keeps_the_layers_function_and_cuts_the_int8_error():
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from kftune.serving.int8 import Smoothed, smooth_linears

    layer, x = _outlier_layer()
    smoothed = torch.nn.Sequential(torch.nn.Linear(64, 32))
    smoothed.load_state_dict(layer.state_dict())
    smooth_linears(smoothed, {"0": x.abs().amax(0)}, 0.8)
    assert isinstance(smoothed[0], Smoothed)
    with torch.no_grad():
        exact = layer(x)
        assert torch.allclose(smoothed(x), exact, atol=1e-4), "smoothing alone must not change the function"

        def int8_error(model):
            q = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
            return float((q(x) - exact).abs().mean() / exact.abs().mean())

        plain, smooth = int8_error(layer), int8_error(smoothed)
    assert smooth < plain / 2, f"int8 error relative to the output: plain {plain:.4f}, smoothed {smooth:.4f}"


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_fallback_recomputes_exactly_the_unsure_texts_in_fp32(tiny_model, task):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from kftune.predict import pad_batch
    from kftune.serving.precision import Int8Recipe, convert

    auto = AutoModelForTokenClassification if task == "token-classification" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = auto.from_pretrained(tiny_model, num_labels=3).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    seqs = tok(["gainoku said the lossira", "dropmek", "the the the gainoku lossira dropmek said"])["input_ids"]
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    with torch.inference_mode():
        fp32 = model(input_ids=ids, attention_mask=mask).logits
        always = convert(model, "int8", Int8Recipe(0.8, seqs, tok.pad_token_id, fallback_margin=1.0))
        got = always(input_ids=ids, attention_mask=mask).logits
        assert always.recomputed == always.seen == 3
        real = mask.bool()
        same = got[real] if task == "token-classification" else got
        assert torch.allclose(same, fp32[real] if task == "token-classification" else fp32, atol=1e-5)

        never = convert(model, "int8", Int8Recipe(0.8, seqs, tok.pad_token_id, fallback_margin=1e-9))
        int8 = never(input_ids=ids, attention_mask=mask).logits
        assert never.recomputed == 0 and never.seen == 3
        assert not torch.equal(int8, fp32), "without recomputing, the answers are int8's own"

        class Overflowing(torch.nn.Module):  # int8 answering NaN for the second text
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, **kwargs):
                out = self.inner(**kwargs)
                out.logits[1] = float("nan")
                return out

        never.int8, never.seen = Overflowing(never.int8), 0
        got = never(input_ids=ids, attention_mask=mask).logits
        assert never.recomputed == 1, "a NaN answer is unsure: recomputed in fp32"
        assert torch.isfinite(got[real] if task == "token-classification" else got).all()


def test_a_channel_silent_in_calibration_is_left_unsmoothed():
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from kftune.serving.int8 import smooth_linears

    layer, x = _outlier_layer()
    calibration = x.clone()
    calibration[:, 5] = 0  # e.g. a ReLU unit that never fired on the calibration rows
    x[:, 5] = 0.3  # and fires when serving
    smoothed = torch.nn.Sequential(torch.nn.Linear(64, 32))
    smoothed.load_state_dict(layer.state_dict())
    smooth_linears(smoothed, {"0": calibration.abs().amax(0)}, 0.8)
    assert float(smoothed[0].inv_s[5]) == 1.0
    with torch.no_grad():
        exact = layer(x)
        q = quantize_dynamic(smoothed, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        assert float((q(x) - exact).abs().mean() / exact.abs().mean()) < 0.02


def test_a_taggers_fallback_ignores_the_special_tokens_margins():
    from types import SimpleNamespace

    import torch

    from kftune.serving.int8 import FallbackToFp32

    class Fixed(torch.nn.Module):  # a model whose logits are given: margins chosen per token
        config = None

        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=self.logits[: len(input_ids), : input_ids.shape[1]].clone())

    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 102, 0, 0], [101, 8, 9, 102, 0]])
    logits = torch.tensor([5.0, 0.0, 0.0]).repeat(3, 5, 1)
    coin = torch.tensor([1.0, 1.0, 0.0])  # top-two margin 0
    logits[:, 0] = coin  # [CLS] of every text
    logits[0, 3] = coin  # [SEP] of text 0
    logits[1, 1] = coin  # a word of text 1: the only text int8 is unsure of
    logits[2, 4] = coin  # padding of text 2
    fallback = FallbackToFp32(Fixed(logits), Fixed(torch.zeros_like(logits)), 0.25, unread_ids=(101, 102))
    fallback(input_ids=ids, attention_mask=(ids != 0).long())
    assert (fallback.seen, fallback.recomputed) == (3, 1)


def test_unread_ids_are_the_specials_and_continuation_pieces(tiny_model):
    from transformers import AutoTokenizer

    from kftune.serving.model import unread_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    unread, vocab = set(unread_ids(tok)), tok.get_vocab()
    assert {tok.cls_token_id, tok.sep_token_id} <= unread and tok.unk_token_id not in unread
    pieces = {p for p in vocab if p.startswith("##")}
    assert pieces and {vocab[p] for p in pieces} <= unread and len(unread) == len(pieces) + 2
    enc = tok(["gainoku", "said"], is_split_into_words=True)  # what word_predictions reads: first sub-tokens
    read = {enc["input_ids"][pos] for pos, w in enumerate(enc.word_ids()) if w is not None
            and (pos == 0 or enc.word_ids()[pos - 1] != w)}
    assert not read & unread


def test_calibration_rows_are_training_rows_and_agreement_rows_are_held_out():
    rows = pd.DataFrame({"text": [f"t{i}" for i in range(10)],
                         "split": ["train"] * 5 + ["validation"] * 2 + ["test"] * 3})
    held, calibration = split_texts(rows, 4, 3)
    assert held == ["t7", "t8", "t9", "t5"], "test rows first, then validation, up to the limit"
    assert calibration == ["t0", "t1", "t2"]
    assert split_texts(rows, 4, 0)[1] == []


def test_int8_settings_are_validated():
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", ["serve.int8_smoothing=1.5", "serve.int8_fallback_margin=-0.1",
                                           "serve.int8_calibration_rows=-1"])
    for key in ("serve.int8_smoothing=1.5", "serve.int8_fallback_margin=-0.1", "serve.int8_calibration_rows=-1"):
        assert key in str(err.value)
