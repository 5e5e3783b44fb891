"""The fidelity study's implementation checks (catmerge/fidelity.py, docs/fidelity.md): does the
conflict CAT removes on its exemplars also leave the merged model's own features, layer by layer,
and does the study's path reproduce the pipeline (c = 0 is Task Arithmetic, decomposition rows)?"""

from __future__ import annotations

import pytest
import torch

from catmerge import cat, fidelity
from catmerge.features import capture, layer_inputs
from catmerge.models import create_image_tower
from catmerge.params import load_params
from catmerge.task_vectors import apply_task_vector
from catmerge.workspace import Workspace

TASKS = 3


def task_images(task: int, count: int, seed: int) -> torch.Tensor:
    """uint8 images of one synthetic "task": a task-specific pattern plus per-image noise."""
    pattern = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(100 + task)) * 200
    noise = torch.rand(count, 32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 55
    return (pattern + noise).to(torch.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_conflict_removed_on_exemplars_also_leaves_the_merged_models_own_features(seed):
    """Random tiny ViT, random task vectors, task-specific random images. The bases come from 2
    exemplars per task on theta_0 + T_k; the merged model (alpha 0.5, no rescale) is then run on
    other images of each task. On every linear weight, CAT's trim removes more of the conflict term
    sum_k sum_{i != k} ||X_k T_i^T||^2 of the merged model's own rows than random bases with as many
    directions do, and in the whole model it keeps most of the share it removed on the exemplars."""
    torch.manual_seed(seed)
    tower = create_image_tower("micro-vit-minilm")
    theta0 = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    task_vectors = [
        {k: 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta0.items() if v.is_floating_point()}
        for _ in range(TASKS)
    ]
    features = []
    for k in range(TASKS):
        tensors, pieces, info = capture(tower, apply_task_vector(theta0, task_vectors[k]), task_images(k, 2, seed))
        features.append((*layer_inputs(tensors, f"task {k}"), info))
    shapes = {k: tuple(v.shape) for k, v in theta0.items() if v.is_floating_point()}
    from catmerge.adapters import open_clip_vit

    pieces = open_clip_vit.pieces(shapes, "split")
    settings = cat.Settings(c=2, lam=1.0, c_norm=2, lambda_norm=1.0, c_shift=2)
    by_piece, _ = cat.model_removals(pieces, task_vectors, [(f[0], f[1]) for f in features], settings)
    merged = apply_task_vector(theta0, cat.trimmed_sum(pieces, task_vectors, by_piece, rescale=False), 0.5)
    held_out = [task_images(k, 6, 1000 + seed) for k in range(TASKS)]

    conflict = fidelity.conflict_on_features(tower, task_vectors, pieces, by_piece, False, merged, features, held_out)
    rescaled = fidelity.conflict_on_features(tower, task_vectors, pieces, by_piece, True, merged, features, held_out)

    assert len(conflict) == sum(p.family == "linear" for p in pieces) == 2 * 6  # q, k, v, out, fc, proj per block
    for name, row in conflict.items():
        for rows in ("exemplars", "merged"):
            # a trim is a product of orthogonal projections: it can only lower the term
            assert row[f"{rows}_cat"] <= row[f"{rows}_original"] * (1 + 1e-12), name
            assert row[f"{rows}_cat"] == row[f"{rows}_cat_as_merged"]  # no rescale: merged = trimmed
            assert rescaled[name][f"{rows}_cat"] == pytest.approx(row[f"{rows}_cat"], rel=1e-12)
            # rescaling a trimmed T_i back to ||T_i|| multiplies its energies by ||T_i||^2 / ||T~_i||^2 >= 1
            assert rescaled[name][f"{rows}_cat_as_merged"] >= row[f"{rows}_cat"] * (1 - 1e-12), name
        share = {v: 1 - row[f"merged_{v}"] / row["merged_original"] for v in ("cat", "random")}
        assert share["cat"] > share["random"], (name, share)
    on_exemplars = fidelity.removed_share(conflict, "exemplars", "cat")
    on_merged = fidelity.removed_share(conflict, "merged", "cat")
    assert on_exemplars > 0.2
    assert on_merged > 0.5 * on_exemplars, (on_exemplars, on_merged)
    assert on_merged > 2 * fidelity.removed_share(conflict, "merged", "random")


def test_study_points_reproduce_task_arithmetic_and_the_pipelines_decomposition(micro_project):
    """c = 0 (and no norm or shift masks) is Task Arithmetic through the whole study path: same
    curve, alpha, test scores and decomposition. The Task Arithmetic point's decomposition is the
    evaluate stage's at the same alpha. The features the study recomputes for the project's own
    exemplars equal the features stage's files."""
    import json

    ws = Workspace(load_params(micro_project / "params.yaml"), micro_project)
    experts = fidelity.experts_accuracy(ws)
    alphas = [0.3, 0.6]
    ta = fidelity.run_point(ws, {"method": "task_arithmetic"}, alphas, experts)
    cat_zero = fidelity.run_point(ws, {"c": 0}, alphas, experts)
    assert cat_zero["val_curve"] == ta["val_curve"]
    assert cat_zero["alpha"] == ta["alpha"] and cat_zero["test"] == ta["test"]
    assert cat_zero["decomposition"] == ta["decomposition"]
    assert cat_zero["conflict_removed"]["merged_cat"] == 0.0

    stage = json.loads((micro_project / "metrics/decomposition.json").read_text())
    at_stage_alpha = fidelity.run_point(ws, {"method": "task_arithmetic"}, [stage["alpha"]], experts)
    assert at_stage_alpha["decomposition"] == pytest.approx(stage["average"])
    assert experts == {t: pytest.approx(r["expert"]) for t, r in stage["tasks"].items()}

    assert fidelity.task_features(ws, ws.params.cat.exemplars, ws.params.cat.feature_alpha) is ws.features
    # the in-memory path gives what the features stage wrote, for the same params
    for (linear, sums, _), (stage_linear, stage_sums, _) in zip(fidelity.compute_task_features(ws, ws.params.cat.exemplars, ws.params.cat.feature_alpha), ws.features):
        assert set(linear) == set(stage_linear) and set(sums) == set(stage_sums)
        for name, x in linear.items():
            torch.testing.assert_close(x.gram_matrix(), stage_linear[name].gram_matrix(), rtol=1e-6, atol=1e-9)
        for name, x in sums.items():
            torch.testing.assert_close(x, stage_sums[name])
