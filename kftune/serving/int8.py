"""int8 inference: SmoothQuant-style smoothing, per-channel dynamic quantisation, fp32 for unsure texts.

See kftune.serving.precision.Int8Recipe for what each part does and why; this module holds the torch code.
"""

from __future__ import annotations

import copy
import warnings

import torch

from kftune.predict import _forward


def quantise(model, smoothing: float, calibration: list, pad_id: int, fallback_margin: float,
             unread_ids: tuple = ()):
    """An int8 copy of `model` (left unchanged): smoothed where `calibration` is given, every Linear quantised
    with per-output-channel weight scales, wrapped in FallbackToFp32 when `fallback_margin` > 0."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    copied = copy.deepcopy(model)
    if smoothing and calibration:
        smooth_linears(copied, activation_max(model, calibration, pad_id), smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice, once per load
        quantised = quantize_dynamic(copied, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    return FallbackToFp32(quantised, model, fallback_margin, unread_ids) if fallback_margin > 0 else quantised


def activation_max(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> dict:
    """{Linear layer name: max |input| per input channel} over `seqs`, run through `model` in padded batches."""
    found: dict = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            found[name] = torch.maximum(found[name], x) if name in found else x
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        for _ in _forward(model, seqs, pad_id, batch_size, bf16=False):
            pass
    finally:
        for h in hooks:
            h.remove()
    return found


def smooth_linears(model, act_max: dict, alpha: float) -> None:
    """Replace (in place) every Linear with a measured input range by `Smoothed`: same function, flatter input."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, torch.nn.Linear) and full in act_max:
                x = act_max[full]
                w = child.weight.detach().abs().amax(0).float().clamp(min=1e-5)
                s = (x.clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
                # a channel silent on every calibration row keeps s = 1: a tiny s would turn its first
                # non-zero input into the outlier that sets the whole batch's int8 scale
                setattr(parent, name, Smoothed(child, torch.where(x > 1e-5, s, torch.ones_like(s))))


class Smoothed(torch.nn.Module):
    """y = (x / s) @ (W * s)^T + b: the Linear's function, with input channel j scaled down by s_j."""

    def __init__(self, linear, s):
        super().__init__()
        self.register_buffer("inv_s", (1.0 / s).to(linear.weight.dtype))
        self.linear = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight * s.to(linear.weight.dtype))
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)

    def forward(self, x):
        return self.linear(x * self.inv_s)


class FallbackToFp32(torch.nn.Module):
    """The int8 model's answers, except for texts it is unsure of (top-two probability margin below `margin`),
    which the fp32 model recomputes. Only `logits` are recomputed; `recomputed / seen` counts texts (a tagger's
    long sentence: its windows). A tagger's margin skips `unread_ids`, tokens whose tags no answer reads.
    """

    def __init__(self, int8, fp32, margin: float, unread_ids: tuple = ()):
        super().__init__()
        self.int8, self.fp32, self.margin = int8, fp32, margin
        self.unread_ids = torch.tensor(sorted(unread_ids), dtype=torch.long)
        self.config = int8.config
        self.reset_counts()

    def reset_counts(self) -> None:
        self.seen = self.recomputed = 0

    def forward(self, input_ids, attention_mask, **kwargs):
        out = self.int8(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        self.seen += len(input_ids)
        if out.logits.shape[-1] < 2:
            return out
        top = out.logits.float().softmax(-1).topk(2, dim=-1).values
        margin = top[..., 0] - top[..., 1]
        if margin.dim() == 2:  # token classification: the least certain token an answer reads
            read = (attention_mask != 0) & ~torch.isin(input_ids, self.unread_ids)
            margin = margin.masked_fill(~read, 1.0).amin(1)
        rows = (~(margin >= self.margin)).nonzero().flatten()  # NaN (an int8 overflow) is unsure too
        if len(rows):
            n = int(attention_mask[rows].sum(1).max())  # pad_batch pads on the right
            redo = self.fp32(input_ids=input_ids[rows, :n], attention_mask=attention_mask[rows, :n], **kwargs)
            if out.logits.dim() == 3:
                out.logits[rows, :n] = redo.logits.to(out.logits.dtype)
            else:
                out.logits[rows] = redo.logits.to(out.logits.dtype)
            self.recomputed += len(rows)
        return out
