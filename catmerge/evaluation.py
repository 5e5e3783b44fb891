"""Top-1 accuracy of an image tower with a zero-shot head, and the results table and chart."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .io import ArtifactError, atomic_path, load_weights
from .models import encode_images

REFERENCE_ROWS = ("pretrained", "expert")


@torch.no_grad()
def accuracy(tower: nn.Module, head: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Percentage of images whose most similar class embedding is the true class."""
    predictions = (encode_images(tower, images, batch_size) @ head.T).argmax(dim=1)
    return 100.0 * (predictions == labels).double().mean().item()


def load_head(path, num_classes: int | None = None, embed_dim: int | None = None) -> torch.Tensor:
    """The (num_classes, embed_dim) zero-shot head stored by the experts stage. Refused, naming the
    file: no 2-D 'weight', NaN or Inf in it, or (when given) a row count other than the dataset's
    `num_classes` or a column count other than the tower's embedding width `embed_dim`."""
    head = load_weights(path).get("weight")
    if head is None or head.ndim != 2:
        raise ArtifactError(f"{path}: expected a 2-D tensor 'weight' (num_classes x embed_dim)")
    if not head.is_floating_point():
        raise ArtifactError(f"{path}: 'weight' is {head.dtype}, expected a floating-point tensor")
    if not torch.isfinite(head).all():
        raise ArtifactError(f"{path}: 'weight' contains NaN or Inf")
    if num_classes is not None and head.shape[0] != num_classes:
        raise ArtifactError(f"{path}: 'weight' has {head.shape[0]} rows, the dataset has {num_classes} classes")
    if embed_dim is not None and head.shape[1] != embed_dim:
        raise ArtifactError(f"{path}: 'weight' has {head.shape[1]} columns, the image tower's embeddings have {embed_dim}")
    return head


def summarize(per_task: dict[str, dict[str, float]], methods: list[str]) -> dict:
    """Metrics JSON: accuracy per task and row, averages, and accuracy normalised to the expert's."""
    rows = list(REFERENCE_ROWS) + methods
    tasks = list(per_task)
    average = {r: sum(per_task[t][r] for t in tasks) / len(tasks) for r in rows}
    normalized = {
        r: {t: 100.0 * per_task[t][r] / per_task[t]["expert"] if per_task[t]["expert"] else 0.0 for t in tasks}
        for r in rows
    }
    for r in rows:
        normalized[r]["average"] = sum(normalized[r][t] for t in tasks) / len(tasks)
    return {"accuracy": per_task, "average": average, "normalized_average": {r: normalized[r]["average"] for r in rows},
            "normalized": normalized}


def results_table(metrics: dict) -> str:
    """Markdown table, one row per model, one column per task (test top-1 %)."""
    per_task = metrics["accuracy"]
    tasks = list(per_task)
    rows = list(metrics["average"])
    lines = [
        "| model | " + " | ".join(tasks) + " | avg | normalized avg |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for r in rows:
        cells = [f"{per_task[t][r]:.1f}" for t in tasks]
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {metrics['average'][r]:.1f} | {metrics['normalized_average'][r]:.1f} |")
    return "\n".join(lines) + "\n"


def bar_chart(metrics: dict, path: str | Path) -> None:
    """The report's accuracy figure (per task and row), as a PNG file."""
    from .report import accuracy_figure

    with atomic_path(path) as tmp:
        tmp.write_bytes(accuracy_figure(metrics))
