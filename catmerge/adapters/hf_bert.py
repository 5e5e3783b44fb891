"""Adapter for HF transformers BERT / RoBERTa encoders (the paper's NLP setting), e.g. `BertModel`,
`RobertaModel`, or the encoder inside a `*ForSequenceClassification` (keys under `bert.` / `roberta.`).

Parameters of a layer `encoder.layer.<i>.` (post-LayerNorm blocks) and the rows that feed them:

| parameter                                   | family     | input rows                                  |
|---------------------------------------------|------------|---------------------------------------------|
| attention.self.query / key / value.weight   | linear     | the layer's input hidden states (`attention.self.input`) |
| attention.output.dense.weight               | linear     | the attention context                       |
| intermediate.dense.weight                   | linear     | attention.output.LayerNorm output           |
| output.dense.weight                         | linear     | the activation output                       |
| attention.output.LayerNorm, output.LayerNorm, embeddings.LayerNorm (weight) | norm_scale | x_hat |
| every bias, LayerNorm bias                  | shift      | none needed                                 |
| pooler.dense.weight                         | linear     | the first token's hidden state              |

Word, position and token-type embeddings and any task head are "other". Feature rows are the
non-padding tokens of the batch (attention_mask == 1): padding positions never reach a prediction.
"""

from __future__ import annotations

import re
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn import functional as F

from .pieces import Piece, whole_or_split

NAME = "hf_bert"

_P = r"^((?:[a-z_]+\.)?"  # optional model prefix: bert., roberta.
_QKV = re.compile(_P + r"encoder\.layer\.\d+\.attention\.self)\.(query|key|value)\.weight$")
_LINEAR_WEIGHT = re.compile(_P + r"(?:encoder\.layer\.\d+\.(?:attention\.output\.dense|intermediate\.dense|output\.dense)|pooler\.dense))\.weight$")
_NORM = re.compile(_P + r"(?:embeddings|encoder\.layer\.\d+\.(?:attention\.output|output))\.LayerNorm)\.(weight|bias)$")
_LINEAR_BIAS = re.compile(_P + r"(?:encoder\.layer\.\d+\.(?:attention\.self\.(?:query|key|value)|attention\.output\.dense|"
                          r"intermediate\.dense|output\.dense)|pooler\.dense))\.bias$")


def matches(model: nn.Module) -> bool:
    """A BertModel / RobertaModel, or a task model wrapping one as `bert` / `roberta` (its
    module names then carry that prefix, as its state dict keys do)."""
    from transformers import BertModel, RobertaModel

    encoders = (BertModel, RobertaModel)
    return isinstance(model, encoders) or any(isinstance(getattr(model, n, None), encoders) for n in ("bert", "roberta"))


def pieces(shapes: dict[str, tuple[int, ...]], qkv: str, conv: bool = False) -> list[Piece]:
    """Every float parameter as CAT pieces, in state-dict order (q, k, v are separate already)."""
    out = []
    for key, shape in shapes.items():
        if m := _QKV.match(key):
            out += whole_or_split(key, "linear", f"{m.group(1)}.input", shape, False)
        elif m := _LINEAR_WEIGHT.match(key):
            out += whole_or_split(key, "linear", m.group(1), shape, False)
        elif m := _NORM.match(key):
            family = "norm_scale" if m.group(2) == "weight" else "shift"
            out += whole_or_split(key, family, m.group(1) if family == "norm_scale" else None, shape, False)
        elif _LINEAR_BIAS.match(key):
            out += whole_or_split(key, "shift", None, shape, False)
        else:
            out += whole_or_split(key, "other", None, shape, False)
    return out


@torch.no_grad()
def capture_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Input rows (non-padding tokens, float32) of every linear layer and x_hat of every LayerNorm,
    keyed by the names `pieces` uses, from one forward pass on a tokenized `batch`
    (input_ids, attention_mask[, token_type_ids])."""
    if not matches(model):
        raise TypeError(f"{NAME} adapter: expected a BERT or RoBERTa model, got {type(model).__name__}")
    keep = batch["attention_mask"].bool()
    rows: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach()
        if x.dim() == 3 and x.shape[:2] == keep.shape:
            x = x[keep]  # (non-padding tokens, d)
        rows[name] = x.reshape(-1, x.shape[-1]).float()

    def on_input(name: str):
        return lambda module, args: record(name, args[0])

    def on_layer_norm(name: str, norm: nn.LayerNorm):
        return lambda module, args: record(name, F.layer_norm(args[0].float(), norm.normalized_shape, eps=norm.eps))

    with ExitStack() as hooks:
        for name, module in model.named_modules():
            hook = None
            if isinstance(module, nn.Linear) and name.endswith("attention.self.query"):
                hook = on_input(f"{name.removesuffix('.query')}.input")
            elif isinstance(module, nn.Linear) and name.endswith(("attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense")):
                hook = on_input(name)
            elif isinstance(module, nn.LayerNorm):
                hook = on_layer_norm(name, module)
            if hook is not None:
                hooks.callback(module.register_forward_pre_hook(hook).remove)
        model.eval()
        model(**batch)
    return rows
