"""The HF CLIP vision adapter: families, captured rows that really feed each layer, and the same
CAT result as the open_clip adapter on the same tiny weights (HF keeps q, k, v separate)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from catmerge import cat
from catmerge.adapters import adapter_for, hf_clip_vision
from catmerge.features import capture, layer_inputs
from catmerge.merging import cat as cat_merge
from catmerge.merging.cat import CatParams
from catmerge.models import create_image_tower
from catmerge.task_vectors import apply_task_vector

PREFIX = "vision_model."


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip VisionTransformer state dict under HF CLIP keys (fused q/k/v split in three)."""
    out = {
        f"{PREFIX}embeddings.class_embedding": state["class_embedding"],
        f"{PREFIX}embeddings.patch_embedding.weight": state["conv1.weight"],
        f"{PREFIX}embeddings.position_embedding.weight": state["positional_embedding"],
        "visual_projection.weight": state["proj"].T.contiguous(),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"{PREFIX}{theirs}.{p}"] = state[f"{ours}.{p}"]
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
    for i in sorted(blocks):
        src, dst = f"transformer.resblocks.{i}.", f"{PREFIX}encoder.layers.{i}."
        for p in ("weight", "bias"):
            for part, tensor in zip("qkv", state[f"{src}attn.in_proj_{p}"].chunk(3)):
                out[f"{dst}self_attn.{part}_proj.{p}"] = tensor
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                                 ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
                out[f"{dst}{theirs}.{p}"] = state[f"{src}{ours}.{p}"]
    return out


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    ours = create_image_tower("micro-vit-minilm")
    with torch.no_grad():  # random biases and norms, so every captured quantity is exercised
        for name, p in ours.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    hf = create_image_tower("micro-hf-clip")
    hf.load_state_dict(open_clip_to_hf(ours.state_dict()))
    return ours, hf


def test_adapter_is_found_and_families_cover_every_parameter(towers):
    _, hf = towers
    assert adapter_for(hf) is hf_clip_vision
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    pieces = hf_clip_vision.pieces(shapes, "split")
    assert [p.key for p in pieces] == list(shapes)  # no split: one piece per parameter
    assert hf_clip_vision.pieces(shapes, "fused") == pieces
    family = {p.key: p.family for p in pieces}
    layer = f"{PREFIX}encoder.layers.1."
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert family[f"{layer}self_attn.{name}.weight"] == "linear"
        assert family[f"{layer}self_attn.{name}.bias"] == "shift"
    assert family[f"{layer}mlp.fc2.weight"] == "linear" and family[f"{layer}layer_norm2.weight"] == "norm_scale"
    assert family[f"{PREFIX}pre_layrnorm.weight"] == "norm_scale" and family[f"{PREFIX}post_layernorm.bias"] == "shift"
    assert family["visual_projection.weight"] == family[f"{PREFIX}embeddings.patch_embedding.weight"] == "other"
    conv = {p.key: p for p in hf_clip_vision.pieces(shapes, "split", conv=True)}
    assert conv[f"{PREFIX}embeddings.patch_embedding.weight"].family == "linear"


def test_converted_tower_computes_the_same_embeddings(towers):
    ours, hf = towers
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf(images), ours(images), rtol=1e-4, atol=1e-5)


def test_captured_rows_are_the_inputs_each_layer_multiplies(towers):
    """Hook rows vs a manual forward: each linear layer applied to its captured rows gives the
    output of that layer in the real forward pass; norm rows are the normalized inputs."""
    _, hf = towers
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    rows = hf_clip_vision.capture_inputs(hf, images)
    outputs = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: outputs.__setitem__(n, out.detach()))
               for n, m in hf.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
    hf(images)
    for h in handles:
        h.remove()
    modules = dict(hf.named_modules())
    for i in range(2):
        layer = f"{PREFIX}encoder.layers.{i}"
        for part in "qkv":
            linear = modules[f"{layer}.self_attn.{part}_proj"]
            expected = outputs[f"{layer}.self_attn.{part}_proj"].reshape(-1, linear.out_features)
            torch.testing.assert_close(linear(rows[f"{layer}.self_attn.qkv_input"]), expected)
        for name in ("self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            linear = modules[f"{layer}.{name}"]
            torch.testing.assert_close(linear(rows[f"{layer}.{name}"]), outputs[f"{layer}.{name}"].reshape(-1, linear.out_features))
        norm = modules[f"{layer}.layer_norm1"]
        torch.testing.assert_close(rows[f"{layer}.layer_norm1"] * norm.weight + norm.bias, outputs[f"{layer}.layer_norm1"].reshape(-1, 16))
    assert rows[f"{PREFIX}encoder.layers.0.self_attn.qkv_input"].shape == (2 * 17, 16)
    # HF applies post_layernorm to the pooled class token only: one row per image, not 17
    assert rows[f"{PREFIX}post_layernorm"].shape == (2, 16)


def test_cat_gives_the_same_trim_on_an_open_clip_and_an_hf_copy_of_the_same_weights(towers):
    ours, hf = towers
    theta0 = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    vectors = [{k: 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta0.items()}
               for _ in range(3)]
    images = [torch.randint(0, 256, (2, 32, 32, 3), generator=torch.Generator().manual_seed(10 + k), dtype=torch.uint8) for k in range(3)]
    params = CatParams(c=2, qkv="split")

    def trim(tower, pretrained, task_vectors):
        features = []
        for k in range(3):
            tensors, _, info = capture(tower, apply_task_vector(pretrained, task_vectors[k]), images[k])
            features.append((*layer_inputs(tensors, f"task {k}"), info))
        pieces, by_piece, *_ = cat_merge.compute_removals(pretrained, task_vectors, features, params, ["a", "b", "c"])
        return pieces, cat.trimmed_vectors(pieces, task_vectors, by_piece, rescale=True)

    pieces_ours, trimmed_ours = trim(ours, theta0, vectors)
    pieces_hf, trimmed_hf = trim(hf, open_clip_to_hf(theta0), [open_clip_to_hf(v) for v in vectors])
    assert len(pieces_hf) == len(pieces_ours)
    for k in range(3):
        converted = open_clip_to_hf(trimmed_ours[k])
        assert set(converted) == set(trimmed_hf[k])
        for key, value in converted.items():
            # float32 captures of the two forwards differ by ~1e-7, so the trims agree to ~1e-6 of the largest entry
            if key == f"{PREFIX}post_layernorm.weight":
                continue  # open_clip normalizes every token there and pools after; HF only the pooled one
            torch.testing.assert_close(trimmed_hf[k][key], value, rtol=0, atol=1e-5 * value.abs().max().item(), msg=lambda m, key=key: f"{key}: {m}")
    original = open_clip_to_hf(vectors[0])
    moved = [p.key for p in pieces_hf if p.family == "linear"
             if (trimmed_hf[0][p.key] - original[p.key]).abs().max() > 1e-2 * original[p.key].abs().max()]
    assert len(moved) == 2 * 6  # every linear weight was trimmed far beyond the tolerance: the comparison is not vacuous


def test_patch_embedding_rows_with_conv(towers):
    _, hf = towers
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    rows = hf_clip_vision.capture_inputs(hf, images)[hf_clip_vision.PATCH_EMBEDDING]
    weight = hf.vision_model.embeddings.patch_embedding.weight
    expected = F.conv2d(images, weight, stride=8).flatten(2).transpose(1, 2).reshape(-1, 16)
    torch.testing.assert_close(rows @ weight.reshape(16, -1).T, expected, rtol=1e-5, atol=1e-5)
