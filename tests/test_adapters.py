"""The open_clip ViT adapter: parameter families, and input rows that really feed each layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from catmerge.adapters import adapter_for, open_clip_vit
from catmerge.models import create_image_tower


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    tower = create_image_tower("micro-vit-minilm")
    # random (not zero-init) biases and norms, so every captured quantity is exercised
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return tower


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_out_proj_of_recomputed_context_is_the_attention_output(tower, images):
    block = tower.transformer.resblocks[1]
    x = block.ln_1(torch.randn(3, 17, 16, generator=torch.Generator().manual_seed(2)))
    expected = block.attn(x, x, x, need_weights=False)[0]
    context = open_clip_vit.attention_context(block.attn, x)
    torch.testing.assert_close(block.attn.out_proj(context), expected, rtol=1e-5, atol=1e-6)


def test_captured_context_through_out_proj_is_the_attention_output_in_a_real_forward(tower, images):
    outputs = {}
    handles = [
        block.attn.register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out[0]))
        for i, block in enumerate(tower.transformer.resblocks)
    ]
    try:
        rows = open_clip_vit.capture_inputs(tower, images)
    finally:
        for handle in handles:
            handle.remove()
    for i, block in enumerate(tower.transformer.resblocks):
        context = rows[f"transformer.resblocks.{i}.attn.out_proj"]
        torch.testing.assert_close(block.attn.out_proj(context), outputs[i].reshape(-1, 16), rtol=1e-5, atol=1e-6)


def test_captured_rows_are_the_inputs_of_each_layer(tower, images):
    rows = open_clip_vit.capture_inputs(tower, images)
    tokens = 3 * 17  # 3 images x (16 patches + class token)
    for i, block in enumerate(tower.transformer.resblocks):
        p = f"transformer.resblocks.{i}."
        for name in ("ln_1", "ln_2", "attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            assert rows[p + name].shape[0] == tokens
        # ln_1's x_hat through its affine part is in_proj's input
        torch.testing.assert_close(rows[p + "ln_1"] * block.ln_1.weight + block.ln_1.bias, rows[p + "attn.in_proj"])
        torch.testing.assert_close(rows[p + "ln_2"] * block.ln_2.weight + block.ln_2.bias, rows[p + "mlp.c_fc"])
        # c_proj's input is the GELU of c_fc's output
        torch.testing.assert_close(F.gelu(block.mlp.c_fc(rows[p + "mlp.c_fc"])), rows[p + "mlp.c_proj"])
        # x_hat is normalized: zero mean, unit variance per row
    for name in ("ln_pre", "ln_post") + tuple(f"transformer.resblocks.{i}.ln_{j}" for i in range(2) for j in (1, 2)):
        x_hat = rows[name]  # normalized, pre-affine: zero mean, unit variance per row
        torch.testing.assert_close(x_hat.mean(dim=1), torch.zeros(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(x_hat.var(dim=1, unbiased=False), torch.ones(tokens), atol=1e-3, rtol=0)
    # the patch embedding's rows are the unfolded patches its kernel multiplies
    kernel = tower.conv1.weight.reshape(16, -1)
    patches = tower.conv1(images).flatten(2).transpose(1, 2).reshape(-1, 16)
    torch.testing.assert_close(rows["conv1"] @ kernel.T, patches, rtol=1e-5, atol=1e-5)
    # the first block's ln_1 reads ln_pre's output
    ln_pre = tower.ln_pre
    first = tower.transformer.resblocks[0]
    ln1_input = rows["ln_pre"] * ln_pre.weight + ln_pre.bias
    torch.testing.assert_close(F.layer_norm(ln1_input, (16,), eps=first.ln_1.eps), rows["transformer.resblocks.0.ln_1"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qkv", ["split", "fused"])
def test_every_parameter_row_is_in_exactly_one_piece(tower, qkv):
    shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    pieces = open_clip_vit.pieces(shapes, qkv)
    covered = {k: torch.zeros(s[0] if s else 1, dtype=torch.int64) for k, s in shapes.items()}
    for piece in pieces:
        covered[piece.key][piece.start : piece.stop] += 1
    assert all(bool((c == 1).all()) for c in covered.values())

    by_family = {}
    for piece in pieces:
        by_family.setdefault(piece.family, []).append(piece.name)
    in_proj = [n for n in by_family["linear"] if "in_proj" in n]
    assert len(in_proj) == (6 if qkv == "split" else 2)  # 2 blocks
    assert len(by_family["linear"]) == 2 * 3 + len(in_proj)
    assert set(by_family["norm_scale"]) == {"ln_pre.weight", "ln_post.weight"} | {
        f"transformer.resblocks.{i}.ln_{j}.weight" for i in range(2) for j in (1, 2)
    }
    assert set(by_family["other"]) == {"class_embedding", "positional_embedding", "proj", "conv1.weight"}
    with_conv = open_clip_vit.pieces(shapes, qkv, conv=True)
    conv = [p for p in with_conv if p.key == "conv1.weight"]
    assert [(p.family, p.input) for p in conv] == [("linear", "conv1")]
    assert len(by_family["shift"]) == 6 + 2 * (3 + (3 if qkv == "split" else 1))


def test_every_piece_input_is_captured(tower, images):
    rows = open_clip_vit.capture_inputs(tower, images)
    pieces = open_clip_vit.pieces({k: tuple(v.shape) for k, v in tower.state_dict().items()}, "split")
    needed = {p.input for p in pieces if p.input}
    assert needed | {"conv1"} == set(rows)
    shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    for p in pieces:
        if p.family == "linear":
            assert rows[p.input].shape[1] == shapes[p.key][1]


def test_adapter_for_refuses_unknown_models():
    assert adapter_for(create_image_tower("micro-vit-minilm")) is open_clip_vit
    with pytest.raises(TypeError, match="no architecture adapter for Linear"):
        adapter_for(torch.nn.Linear(2, 2))
