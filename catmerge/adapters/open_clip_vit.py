"""Adapter for open_clip `VisionTransformer` image towers.

What CAT needs to know about an architecture, for this one:
- every parameter's family (linear weight, norm scale, shift, other) and, for linear weights and
  norm scales, which captured input feeds it;
- the input rows of every such layer, captured on a batch of images: all tokens of all images
  stacked as rows.

Parameters of a residual block `transformer.resblocks.<i>` and the rows that feed them:

| parameter                  | family     | input rows                                          |
|----------------------------|------------|-----------------------------------------------------|
| attn.in_proj_weight        | linear     | ln_1 output (q, k and v all read it)                 |
| attn.out_proj.weight       | linear     | attention context, recomputed (see below)            |
| mlp.c_fc.weight            | linear     | ln_2 output                                          |
| mlp.c_proj.weight          | linear     | GELU output                                          |
| ln_1.weight, ln_2.weight   | norm_scale | the LayerNorm's normalized input x_hat (pre-affine)  |
| every bias, LayerNorm bias | shift      | none needed                                          |

`ln_pre` and `ln_post` are norm scales and shifts too; the class and positional embeddings and
`proj` are "other" (plain task arithmetic). So is the patch embedding `conv1.weight`, unless
`conv=True`: then it is a linear weight (d, 3 * p * p) whose input rows are the unfolded image
patches, as the paper allows.

`nn.MultiheadAttention` applies `out_proj` inside `F.multi_head_attention_forward`, so no hook
ever sees its input. We recompute the context from the attention module's own inputs and weights;
`tests/test_adapters.py` checks that `out_proj(context)` equals the module's output.
"""

from __future__ import annotations

import re
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn import functional as F

from .pieces import Piece, whole_or_split

NAME = "open_clip_vit"

_BLOCK = r"transformer\.resblocks\.\d+\."
_LINEAR_WEIGHT = re.compile(rf"^({_BLOCK}(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj))_?\.?weight$")
_NORM = re.compile(rf"^({_BLOCK}ln_[12]|ln_pre|ln_post)\.(weight|bias)$")
_LINEAR_BIAS = re.compile(rf"^{_BLOCK}(attn\.in_proj_bias|attn\.out_proj\.bias|mlp\.c_fc\.bias|mlp\.c_proj\.bias)$")


def matches(tower: nn.Module) -> bool:
    """An open_clip VisionTransformer of plain residual blocks (no attention pooling)."""
    if type(tower).__name__ != "VisionTransformer" or not hasattr(tower, "conv1") or getattr(tower, "attn_pool", None) is not None:
        return False
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", [])
    return len(blocks) > 0 and all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks)


def pieces(shapes: dict[str, tuple[int, ...]], qkv: str, conv: bool = False) -> list[Piece]:
    """Every float parameter of the tower as CAT pieces, in state-dict order.

    With qkv `split`, the fused `in_proj_weight` (3d, d) and `in_proj_bias` (3d) become three
    pieces each (q, k, v rows), treated as separate layers in every respect.
    """
    out = []
    for key, shape in shapes.items():
        if key == "conv1.weight" and conv:
            out += whole_or_split(key, "linear", "conv1", shape, False)
            continue
        fused_qkv = key.endswith(("attn.in_proj_weight", "attn.in_proj_bias"))
        split = qkv == "split" and fused_qkv
        if m := _LINEAR_WEIGHT.match(key):
            out += whole_or_split(key, "linear", m.group(1), shape, split)
        elif m := _NORM.match(key):
            family = "norm_scale" if m.group(2) == "weight" else "shift"
            out += whole_or_split(key, family, m.group(1) if family == "norm_scale" else None, shape, False)
        elif _LINEAR_BIAS.match(key):
            out += whole_or_split(key, "shift", None, shape, split)
        else:
            out += whole_or_split(key, "other", None, shape, False)
    return out


def attention_context(attn: nn.MultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The input of `attn.out_proj` for self-attention on batch-first x: softmax(QK^T/sqrt(d_h)) V
    per head, heads concatenated."""
    batch, length, width = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return context.transpose(1, 2).reshape(batch, length, width)


@torch.no_grad()
def capture_inputs(tower: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input rows (all tokens of all images, float32) of every linear layer and x_hat of every
    LayerNorm, keyed by module name, from one forward pass of `tower` on normalized `images`."""
    if not matches(tower):
        raise TypeError(f"open_clip_vit adapter: expected an open_clip VisionTransformer, got {type(tower).__name__}")
    rows: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        rows[name] = x.detach().reshape(-1, x.shape[-1]).float()

    def on_attention(name: str, attn: nn.MultiheadAttention):
        def hook(module, args, kwargs):
            query, key, value = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")])[:3]
            if not (query is key is value) and not (torch.equal(query, key) and torch.equal(query, value)):
                raise ValueError(f"{name}: only self-attention is supported")
            if not attn.batch_first:
                query = query.transpose(0, 1)
            mask = kwargs.get("attn_mask")
            record(f"{name}.in_proj", query)
            record(f"{name}.out_proj", attention_context(attn, query, None if mask is None else mask.to(query.dtype)))

        return hook

    def on_linear(name: str):
        return lambda module, args: record(name, args[0])

    def on_patch_embedding(name: str, conv: nn.Conv2d):
        # the rows a (d, 3*p*p) matrix view of the kernel multiplies: one per patch, C x p x p order
        return lambda module, args: record(name, F.unfold(args[0], conv.kernel_size, stride=conv.stride).transpose(1, 2))

    def on_layer_norm(name: str, norm: nn.LayerNorm):
        return lambda module, args: record(name, F.layer_norm(args[0].float(), norm.normalized_shape, eps=norm.eps))

    with ExitStack() as hooks:
        for name, module in tower.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                hooks.callback(module.register_forward_pre_hook(on_attention(name, module), with_kwargs=True).remove)
            elif isinstance(module, nn.Linear) and name.endswith(("mlp.c_fc", "mlp.c_proj")):
                hooks.callback(module.register_forward_pre_hook(on_linear(name)).remove)
            elif isinstance(module, nn.Conv2d) and name == "conv1":
                hooks.callback(module.register_forward_pre_hook(on_patch_embedding(name, module)).remove)
            elif isinstance(module, nn.LayerNorm):
                hooks.callback(module.register_forward_pre_hook(on_layer_norm(name, module)).remove)
        tower.eval()
        tower(images)
    return rows
