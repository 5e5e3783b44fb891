"""One point of the CAT fidelity study (docs/fidelity.md): a merge setting on a built project,
with alpha chosen on validation, scored on test, its loss decomposition, and whether the conflict
CAT removes from its exemplars' features is also removed on the merged model's own features.

A setting is a dict of `cat` params (params.yaml names: exemplars, feature_alpha, c, lambda,
rescale, qkv, ...) applied over the project's `cat` block, or {"method": "task_arithmetic"}.
Everything is computed in memory; nothing under `data/` is written.
"""

from __future__ import annotations

import statistics

import torch

from . import cat, layout
from .decomposition import FAMILIES, decompose
from .features import capture, exemplar_indices, layer_inputs
from .io import StateDict, load_weights
from .merging import cat as cat_merge
from .params import with_params
from .task_vectors import apply_task_vector, sum_task_vectors
from .workspace import Workspace

HELD_OUT_IMAGES = 16  # val images per task on which the merged model's own features are taken


def experts_accuracy(ws: Workspace, split: str = "test") -> dict[str, float]:
    """Each expert on its own task."""
    out = {}
    for task in ws.params.tasks:
        out.update(ws.score(load_weights(layout.checked_expert(task, root=ws.root)), split, [task]))
    return out


def task_features(ws: Workspace, exemplars: int, feature_alpha: float) -> list:
    """Each task's (linear inputs, norm sums of squares, metadata), as the features stage would
    make them with these two params; the stage's own files when the params are the project's."""
    if exemplars == ws.params.cat.exemplars and feature_alpha == ws.params.cat.feature_alpha:
        return ws.features
    return compute_task_features(ws, exemplars, feature_alpha)


def compute_task_features(ws: Workspace, exemplars: int, feature_alpha: float) -> list:
    """What the features stage computes for these params, in memory."""
    out = []
    for task, delta in zip(ws.params.tasks, ws.task_vectors):
        train = ws.split(task, "train")
        chosen = exemplar_indices(exemplars, len(train.labels), ws.params.data_seed, task)
        weights = apply_task_vector(ws.pretrained, delta, feature_alpha)
        tensors, _, info = capture(ws.tower, weights, train.images[chosen])
        out.append((*layer_inputs(tensors, f"{task} features (in memory)"), {"adapter": info["adapter"], "rows": info["rows"]}))
    return out


def cat_removals(ws: Workspace, cat_params, features: list) -> tuple:
    """(pieces, removals by piece) for these params and features."""
    names = [f"{task} features" for task in ws.params.tasks]
    pieces, by_piece, *_ = cat_merge.compute_removals(ws.pretrained, ws.task_vectors, features, cat_params, names)
    return pieces, by_piece


def val_average(ws: Workspace, total: StateDict, alpha: float) -> float:
    return statistics.mean(ws.score(apply_task_vector(ws.pretrained, total, alpha), "val").values())


def held_out_images(ws: Workspace, task: str, count: int = HELD_OUT_IMAGES):
    """A fixed sample of task `task`'s val images: never exemplars (those come from train)."""
    val = ws.split(task, "val")
    return val.images[exemplar_indices(min(count, len(val.labels)), len(val.labels), ws.params.data_seed, task)]


def _energy(x: cat.LayerInput, delta: torch.Tensor) -> float:
    """||X delta^T||_F^2 from rows or from the Gram matrix."""
    if x.rows is not None:
        return float((x.rows @ delta.T).square().sum())
    return float(((delta @ x.gram) * delta).sum())


def _random_removals(removals: list[cat.Removal], generator: torch.Generator) -> list[cat.Removal]:
    """For each task, a random orthonormal basis with as many directions as CAT kept."""
    out = []
    for r in removals:
        d_out, width = r.basis.shape
        basis = torch.linalg.qr(torch.randn(d_out, width, dtype=r.basis.dtype, generator=generator))[0] if width else r.basis
        out.append(cat.Removal(basis, None, [], 0.0))
    return out


def conflict_on_features(
    tower, task_vectors: list[StateDict], pieces, by_piece, rescale: bool, merged: StateDict, exemplar_features: list, held_out: list
) -> dict:
    """Eq. 10's conflict term sum_k sum_{i != k} ||X_k T_i^T||_F^2 per linear weight, for the
    original T_i, CAT's trimmed T_i (without rescale: the trim alone; with the setting's rescale:
    what is merged) and T_i trimmed by random bases of the same size, on two sets of rows:
    `exemplars`, the rows the bases were computed from, and `merged`, the inputs of `tower` loaded
    with the merged weights on each task's `held_out` images (what the merged model actually sees)."""
    merged_inputs = [layer_inputs(capture(tower, merged, images)[0], "merged-model features")[0] for images in held_out]
    generator = torch.Generator().manual_seed(0)
    out = {}
    for piece in pieces:
        if piece.family != "linear":
            continue
        deltas = [cat._as_matrix(piece, piece.of(tv[piece.key]).double()) for tv in task_vectors]
        removals = by_piece[piece.name]
        variants = {
            "original": deltas,
            "cat": [cat.trim(i, d, removals, rescale=False) for i, d in enumerate(deltas)],
            "cat_as_merged": [cat.trim(i, d, removals, rescale=rescale) for i, d in enumerate(deltas)],
            "random": [cat.trim(i, d, _random_removals(removals, generator), rescale=False) for i, d in enumerate(deltas)],
        }
        row = {}
        for rows_name, inputs in (("exemplars", [f[0][piece.input] for f in exemplar_features]), ("merged", [m[piece.input] for m in merged_inputs])):
            for name, vectors in variants.items():
                row[f"{rows_name}_{name}"] = sum(
                    _energy(inputs[k], vectors[i]) for k in range(len(vectors)) for i in range(len(vectors)) if i != k
                )
        out[piece.name] = row
    return out


def removed_share(conflict: dict, rows: str, variant: str) -> float:
    """Share of the whole model's conflict term (summed over linear weights) a variant removes."""
    original = sum(r[f"{rows}_original"] for r in conflict.values())
    return 1.0 - sum(r[f"{rows}_{variant}"] for r in conflict.values()) / original if original else 0.0


def run_point(ws: Workspace, setting: dict, alphas: list[float], experts: dict[str, float], families: tuple[str, ...] = FAMILIES) -> dict:
    """The setting's validation curve over `alphas`, the chosen alpha (best validation average,
    ties to the first in grid order), test accuracy there, the decomposition at that alpha, and
    for CAT the conflict terms on the exemplars' and the merged model's features."""
    original, setting = setting, dict(setting)
    method = setting.pop("method", "cat")
    if method not in ("cat", "task_arithmetic"):
        raise ValueError(f"study setting {original}: method must be cat or task_arithmetic, got {method!r}")
    cat_params, extra = None, None
    vectors = ws.task_vectors
    if method == "cat":
        cat_params = with_params(ws.params.cat, setting)
        features = task_features(ws, cat_params.exemplars, cat_params.feature_alpha)
        pieces, by_piece = cat_removals(ws, cat_params, features)
        vectors = cat.trimmed_vectors(pieces, ws.task_vectors, by_piece, cat_params.rescale)
        extra = (pieces, by_piece, features)
    total = dict(sum_task_vectors(vectors))  # B_k does not depend on alpha: one trim serves the whole grid
    curve = {alpha: val_average(ws, total, alpha) for alpha in alphas}
    best = max(range(len(alphas)), key=lambda j: (curve[alphas[j]], -j))
    alpha = alphas[best]
    merged = apply_task_vector(ws.pretrained, total, alpha)
    test = ws.score(merged, "test")
    result = {
        "setting": original,
        "val_curve": {str(a): v for a, v in curve.items()},
        "alpha": alpha,
        "val_average": curve[alpha],
        "test": test,
        "test_average": statistics.mean(test.values()),
        "decomposition": decompose(ws, alpha, experts, "test", vectors, families, test)["average"],
    }
    if extra is not None:
        pieces, by_piece, features = extra
        held_out = [held_out_images(ws, task) for task in ws.params.tasks]
        conflict = conflict_on_features(ws.tower, ws.task_vectors, pieces, by_piece, cat_params.rescale, merged, features, held_out)
        result["conflict"] = conflict
        result["conflict_removed"] = {
            f"{rows}_{variant}": removed_share(conflict, rows, variant)
            for rows in ("exemplars", "merged") for variant in ("cat", "cat_as_merged", "random")
        }
    return result


def vector_norms(ws: Workspace) -> dict:
    """||T_k|| / ||theta_0|| per task over the float parameters: the size of the experts' steps."""
    theta = torch.cat([v.double().flatten() for v in ws.pretrained.values() if v.is_floating_point()]).norm()
    out = {}
    for task, tv in zip(ws.params.tasks, ws.task_vectors):
        out[task] = float(torch.cat([v.double().flatten() for v in tv.values()]).norm() / theta)
    return out
