"""Task splits on disk: HF `datasets` parquet files with `image` (Image) and `label` (ClassLabel)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .io import ArtifactError, atomic_path

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: torch.Tensor  # (N, H, W, 3) uint8
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]


def write_split(images: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))}
    )
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": pngs, "label": labels.tolist()}, features=features)
    with atomic_path(path) as tmp:
        ds.to_parquet(str(tmp))


def read_split(path: str | Path) -> Split:
    """Decode a split written by `write_split` (or any parquet with Image + ClassLabel columns)."""
    import datasets
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing dataset split: {path}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ArtifactError(f"cannot read parquet file {path}: {exc}") from exc
    features = datasets.Features.from_arrow_schema(table.schema)
    label_feature = features.get("label")
    if not isinstance(label_feature, datasets.ClassLabel) or "image" not in features:
        raise ArtifactError(f"{path}: expected columns 'image' (Image) and 'label' (ClassLabel), got {features}")
    if table.num_rows == 0:
        raise ArtifactError(f"{path}: the split has no rows")
    images = [
        np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"), dtype=np.uint8)
        for cell in table.column("image").to_pylist()
    ]
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= label_feature.num_classes):
        raise ArtifactError(f"{path}: labels outside 0..{label_feature.num_classes - 1}")
    return Split(torch.from_numpy(np.stack(images)), torch.from_numpy(labels), list(label_feature.names))
