"""Adapter for HF transformers CLIP image towers (`CLIPVisionModelWithProjection`, and so the
vision half of `CLIPModel` / `CLIPVisionModel` checkpoints, which share its keys).

Parameters of an encoder layer `vision_model.encoder.layers.<i>.` and the rows that feed them:

| parameter                              | family     | input rows                                   |
|----------------------------------------|------------|----------------------------------------------|
| self_attn.q_proj / k_proj / v_proj.weight | linear  | layer_norm1 output (`self_attn.qkv_input`)   |
| self_attn.out_proj.weight              | linear     | attention context (the input of out_proj)    |
| mlp.fc1.weight                         | linear     | layer_norm2 output                           |
| mlp.fc2.weight                         | linear     | activation output                            |
| layer_norm1.weight, layer_norm2.weight | norm_scale | the LayerNorm's normalized input x_hat       |
| every bias, LayerNorm bias             | shift      | none needed                                  |

`pre_layrnorm` (sic, the HF name) and `post_layernorm` are norm scales and shifts too; the class and
position embeddings and `visual_projection` are "other". The patch embedding is "other" unless
`conv=True` (then a linear map on unfolded patches, as for open_clip).

q, k and v are separate layers here already, so the `qkv` param has nothing to split or fuse:
both values give the same pieces, which are the open_clip adapter's `split` pieces of the same
weights. Unlike open_clip's, HF's `out_proj` is an ordinary `nn.Linear` call, so a hook sees its input.
"""

from __future__ import annotations

import re
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn import functional as F

from .pieces import Piece, whole_or_split

NAME = "hf_clip_vision"

_LAYER = r"vision_model\.encoder\.layers\.\d+\."
_QKV = re.compile(rf"^({_LAYER}self_attn)\.[qkv]_proj\.weight$")
_LINEAR_WEIGHT = re.compile(rf"^({_LAYER}(self_attn\.out_proj|mlp\.fc1|mlp\.fc2))\.weight$")
_NORM = re.compile(r"^(vision_model\.(pre_layrnorm|post_layernorm|encoder\.layers\.\d+\.layer_norm[12]))\.(weight|bias)$")
_LINEAR_BIAS = re.compile(rf"^{_LAYER}(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc1|mlp\.fc2)\.bias$")
PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding"


def matches(tower: nn.Module) -> bool:
    from transformers import CLIPVisionModelWithProjection

    return isinstance(tower, CLIPVisionModelWithProjection)


def pieces(shapes: dict[str, tuple[int, ...]], qkv: str, conv: bool = False) -> list[Piece]:
    """Every float parameter of the tower as CAT pieces, in state-dict order."""
    out = []
    for key, shape in shapes.items():
        if key == f"{PATCH_EMBEDDING}.weight" and conv:
            out += whole_or_split(key, "linear", PATCH_EMBEDDING, shape, False)
        elif m := _QKV.match(key):
            out += whole_or_split(key, "linear", f"{m.group(1)}.qkv_input", shape, False)
        elif m := _LINEAR_WEIGHT.match(key):
            out += whole_or_split(key, "linear", m.group(1), shape, False)
        elif m := _NORM.match(key):
            family = "norm_scale" if m.group(3) == "weight" else "shift"
            out += whole_or_split(key, family, m.group(1) if family == "norm_scale" else None, shape, False)
        elif _LINEAR_BIAS.match(key):
            out += whole_or_split(key, "shift", None, shape, False)
        else:
            out += whole_or_split(key, "other", None, shape, False)
    return out


@torch.no_grad()
def capture_inputs(tower: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input rows (all tokens of all images, float32) of every linear layer and x_hat of every
    LayerNorm, keyed by the names `pieces` uses, from one forward pass on normalized `images`."""
    if not matches(tower):
        raise TypeError(f"{NAME} adapter: expected a CLIPVisionModelWithProjection, got {type(tower).__name__}")
    rows: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        rows[name] = x.detach().reshape(-1, x.shape[-1]).float()

    def on_linear(name: str):
        return lambda module, args: record(name, args[0])

    def on_patch_embedding(conv: nn.Conv2d):
        return lambda module, args: record(PATCH_EMBEDDING, F.unfold(args[0], conv.kernel_size, stride=conv.stride).transpose(1, 2))

    def on_layer_norm(name: str, norm: nn.LayerNorm):
        return lambda module, args: record(name, F.layer_norm(args[0].float(), norm.normalized_shape, eps=norm.eps))

    with ExitStack() as hooks:
        for name, module in tower.named_modules():
            hook = None
            if isinstance(module, nn.Linear) and name.endswith("self_attn.q_proj"):
                hook = on_linear(f"{name.removesuffix('.q_proj')}.qkv_input")
            elif isinstance(module, nn.Linear) and name.endswith(("self_attn.out_proj", "mlp.fc1", "mlp.fc2")):
                hook = on_linear(name)
            elif isinstance(module, nn.Conv2d) and name == PATCH_EMBEDDING:
                hook = on_patch_embedding(module)
            elif isinstance(module, nn.LayerNorm):
                hook = on_layer_norm(name, module)
            if hook is not None:
                hooks.callback(module.register_forward_pre_hook(hook).remove)
        tower.eval()
        tower(images)
    return rows
