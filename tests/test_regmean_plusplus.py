"""RegMean++ (catmerge/merging/regmean_plusplus.py): stages read off the parameter names, and
what taking the inputs through the merged model changes (and what it must not)."""

from __future__ import annotations

import torch

import catmerge
from catmerge.merging import MergeInputs, merge_method
from catmerge.merging.regmean import RegMeanParams
from catmerge.merging.regmean_plusplus import RegMeanPlusPlusParams, stages

TASKS = ["a", "b", "c"]


def tower_and_data(seed: int = 0):
    torch.manual_seed(seed)
    tower = catmerge.create_image_tower("micro-vit-minilm")
    theta0 = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    exemplars = [torch.randint(0, 256, (4, 32, 32, 3), generator=g, dtype=torch.uint8) for _ in TASKS]
    return tower, theta0, exemplars, g


def deltas_in(theta0: dict, g, keep) -> list[dict]:
    """Task vectors that are non-zero only on the keys `keep` accepts."""
    return [{k: (0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64) * (v.abs().mean() + 1e-3)) * bool(keep(k))
             for k, v in theta0.items() if v.is_floating_point()} for _ in TASKS]


def merged(method, tower, theta0, tvs, exemplars, params):
    if method == "regmean_plusplus":
        return merge_method(method)(theta0, tvs, params, MergeInputs(model=tower, exemplars=exemplars))
    from catmerge.features import capture, layer_inputs
    from catmerge.task_vectors import apply_task_vector

    inputs = [layer_inputs(capture(tower, apply_task_vector(theta0, tv), x)[0], "x")[0] for tv, x in zip(tvs, exemplars)]
    shapes = {k: tuple(v.shape) for k, v in theta0.items() if v.is_floating_point()}
    from catmerge.adapters import adapter_for

    pieces = [p for p in adapter_for(tower).pieces(shapes, "fused") if p.family == "linear"]
    return merge_method(method)(theta0, tvs, params, MergeInputs(pieces=pieces, layer_inputs=inputs))


def test_stages_follow_the_blocks_in_order():
    keys = ["conv1.weight", "class_embedding", "ln_pre.weight", "transformer.resblocks.0.attn.in_proj_weight",
            "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.1.mlp.c_fc.weight", "ln_post.weight", "proj"]
    assert stages(keys) == [keys[:3], keys[3:5], keys[5:6], keys[6:]]
    assert stages(["encoder.layer.10.x", "encoder.layer.2.x", "pooler.dense.weight"]) == [["encoder.layer.2.x"], ["encoder.layer.10.x"], ["pooler.dense.weight"]]


def test_experts_that_differ_only_in_the_last_block_give_regmean_exactly():
    """Every stage before the last is the same in every expert, so the merged stages before it
    are that too: the last block's inputs are the same through the merged model as through each
    expert, and RegMean++ is RegMean."""
    tower, theta0, exemplars, g = tower_and_data()
    tvs = deltas_in(theta0, g, lambda k: k.startswith("transformer.resblocks.1."))
    plus = merged("regmean_plusplus", tower, theta0, tvs, exemplars, RegMeanPlusPlusParams(nondiagonal_scale=0.5))
    plain = merged("regmean", tower, theta0, tvs, exemplars, RegMeanParams(nondiagonal_scale=0.5))
    for key, value in plain.items():
        torch.testing.assert_close(plus[key], value, rtol=1e-6, atol=1e-7)


def test_inputs_through_the_merged_model_change_the_later_blocks_only():
    tower, theta0, exemplars, g = tower_and_data(1)
    tvs = deltas_in(theta0, g, lambda k: k.startswith("transformer."))  # embeddings shared: block 0 sees the same inputs
    plus = merged("regmean_plusplus", tower, theta0, tvs, exemplars, RegMeanPlusPlusParams())
    plain = merged("regmean", tower, theta0, tvs, exemplars, RegMeanParams())
    block0 = [k for k in theta0 if k.startswith("transformer.resblocks.0.")]
    block1 = [k for k in theta0 if k.startswith("transformer.resblocks.1.") and k.endswith("weight") and theta0[k].dim() == 2]
    for key in block0:
        torch.testing.assert_close(plus[key], plain[key], rtol=1e-6, atol=1e-7)
    assert all(not torch.allclose(plus[k], plain[k], rtol=1e-6, atol=1e-7) for k in block1)


def test_one_task_gives_its_expert_back():
    tower, theta0, exemplars, g = tower_and_data(2)
    tv = deltas_in(theta0, g, lambda k: True)[0]
    out = merge_method("regmean_plusplus")(theta0, [tv], RegMeanPlusPlusParams(nondiagonal_scale=1.0),
                                           MergeInputs(model=tower, exemplars=exemplars[:1]))
    for key, value in tv.items():  # linear weights solved from full-rank Grams, the rest averaged over one task
        torch.testing.assert_close(out[key].double(), theta0[key].double() + value, rtol=1e-4, atol=1e-6)
