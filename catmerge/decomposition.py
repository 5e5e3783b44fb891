"""Where a merge loses accuracy, task by task, split into dilution and interference per family.

For task k at Task Arithmetic's alpha, with accuracies on task k:
    expert  E_k = acc(theta_k)
    solo    S_k = acc(theta_0 + alpha T_k)                      task k's own vector, scaled
    merged  A_k = acc(theta_0 + alpha sum_i T_i)
    without R_kf = acc(theta_0 + alpha T_k + alpha sum_{i != k} T_i outside family f)
so E_k - A_k = dilution (E_k - S_k) + interference (S_k - A_k), and R_kf - A_k is the accuracy
task k gets back when the other tasks' deltas leave family f (linear weights, norm scales,
shifts, other): where the cross-task interference sits.

With `vectors` (e.g. CAT's trimmed T_i) in place of the task vectors, the same split describes
that merge: its solo row is theta_0 + alpha * trimmed T_k, so trimming that costs task k its own
signal shows up as dilution, and the interference left shows what the trim did not remove.
"""

from __future__ import annotations

import statistics

from .adapters import adapter_for
from .task_vectors import apply_task_vector, sum_task_vectors
from .workspace import Workspace

FAMILIES = ("linear", "norm_scale", "shift", "other")


def families(ws: Workspace) -> dict[str, str]:
    """Parameter key -> family, from the architecture's adapter."""
    adapter = adapter_for(ws.tower)
    shapes = {k: shape for k, (dtype, shape) in ws.pretrained.specs.items() if dtype.is_floating_point}
    return {p.key: p.family for p in adapter.pieces(shapes, "fused")}


def decompose(
    ws: Workspace, alpha: float, experts: dict[str, float], split: str = "test", vectors: list | None = None,
    only: tuple[str, ...] = FAMILIES, merged_scores: dict[str, float] | None = None,
) -> dict:
    """The split above for every task; `only` limits which families get a "without" row, and
    `merged_scores` (the merged model's accuracies on `split`, if already known) saves a pass."""
    family_of = families(ws)
    tasks = ws.params.tasks
    vectors = ws.task_vectors if vectors is None else vectors
    total = dict(sum_task_vectors(vectors))  # read by every row below: summed once (one model)
    merged = merged_scores or ws.score(apply_task_vector(ws.pretrained, total, alpha), split)
    per_task = {}
    for k, task in enumerate(tasks):
        own = vectors[k]
        row = {"expert": experts[task], "merged": merged[task]}
        row["solo"] = ws.score(apply_task_vector(ws.pretrained, own, alpha), split, [task])[task]
        for family in only:
            delta = {key: own[key] if family_of.get(key, "other") == family else total[key] for key in total}
            row[f"without_{family}"] = ws.score(apply_task_vector(ws.pretrained, delta, alpha), split, [task])[task]
        row["dilution"] = row["expert"] - row["solo"]
        row["interference"] = row["solo"] - row["merged"]
        for family in only:
            row[f"interference_{family}"] = row[f"without_{family}"] - row["merged"]
        per_task[task] = row
    average = {key: statistics.mean(r[key] for r in per_task.values()) for key in next(iter(per_task.values()))}
    return {"alpha": alpha, "split": split, "tasks": per_task, "average": average}
