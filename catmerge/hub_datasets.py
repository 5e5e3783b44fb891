"""The paper's eight image tasks from the Hugging Face hub: which dataset, files, columns, class
names and CLIP prompt templates each uses, and reading its splits through `datasets`.

Parquet files are fetched with `catmerge.hub` (revision and sha256 recorded) and read with
`datasets`' parquet builder; a validation split is carved from train with a seed, test is the
dataset's own test split. Images are resized (shorter side, bicubic) and center-cropped to the
model's input size, as CLIP's preprocessing does, so every later stage reads model-ready images.
Any entry can be overridden, or a new task added, under `hub.datasets.<task>` in params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .hub import HubFile, fetch_matching, is_local
from .io import ArtifactError, sha256_file

OBJECT_TEMPLATES = ["a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
                    "a cropped photo of a {}.", "a close-up photo of a {}."]


@dataclass(frozen=True)
class HubTask:
    repo: str
    templates: list[str]
    files: str = "data/{split}-*.parquet"  # glob of a split's parquet files in the repo
    revision: str = "main"
    image_column: str = "image"
    label_column: str = "label"
    class_names: list[str] | None = None  # None: the label column's ClassLabel names, "_" read as " "
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})


HUB_TASKS: dict[str, HubTask] = {
    "sun397": HubTask("tanganke/sun397", ["a photo of a {}.", "a photo of the {}."]),
    "stanford-cars": HubTask("tanganke/stanford_cars", ["a photo of a {}.", "a photo of the {}.", "a photo of my {}.",
                                                        "i love my {}!", "a photo of my dirty {}.", "a photo of my clean {}.",
                                                        "a photo of my new {}.", "a photo of my old {}."]),
    "resisc45": HubTask("tanganke/resisc45", ["satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.",
                                              "aerial photo of {}.", "satellite view of {}.", "aerial view of {}."]),
    "eurosat": HubTask("tanganke/eurosat", ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                                            "a centered satellite photo of the {}."],
                       class_names=["annual crop land", "forest", "brushland or shrubland", "highway or road",
                                    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
                                    "residential buildings or homes or apartments", "river", "lake or sea"]),
    "svhn": HubTask("ufldl-stanford/svhn", ['a photo of the number: "{}".'], files="cropped_digits/{split}-*.parquet"),
    "gtsrb": HubTask("tanganke/gtsrb", ['a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
                                        'a close up photo of a "{}" traffic sign.']),
    "mnist": HubTask("ylecun/mnist", ['a photo of the number: "{}".'], files="mnist/{split}-*.parquet"),
    "dtd": HubTask("tanganke/dtd", ["a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
                                    "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern."]),
}
HUB_TASK_FIELDS = tuple(HubTask.__dataclass_fields__)


def hub_task(name: str, overrides: dict | None = None) -> HubTask:
    """The registry entry of task `name` with params overrides applied (a task not in the registry
    needs at least `repo` and `templates` there)."""
    overrides = dict(overrides or {})
    if name in HUB_TASKS:
        return replace(HUB_TASKS[name], **overrides)
    missing = [k for k in ("repo", "templates") if k not in overrides]
    if missing:
        raise ArtifactError(f"task {name!r} is not one of the hub tasks ({', '.join(HUB_TASKS)}); "
                            f"hub.datasets.{name} must then give {' and '.join(missing)}")
    return HubTask(**overrides)


@dataclass
class LoadedSplit:
    """A split's labels and class names; images are decoded only for the rows asked for, so a
    large split (SVHN's 73k train images) never sits in memory whole at the model's input size."""

    dataset: object  # datasets.Dataset
    image_column: str
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    files: list[HubFile]
    size: int

    def images(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), size, size, 3) uint8, resized and center-cropped."""
        subset = self.dataset.select(rows.tolist())
        return np.stack([center_crop(image, self.size) for image in subset[self.image_column]]) if len(rows) else \
            np.zeros((0, self.size, self.size, 3), dtype=np.uint8)


def load_split(task: str, spec: HubTask, split: str, size: int) -> LoadedSplit:
    """One split of a hub task: fetched and opened with `datasets` (labels read, images not yet)."""
    import datasets

    where = f"dataset {spec.repo} ({task}, split {split})"
    if split not in spec.splits:
        raise ArtifactError(f"{where}: no split {split!r} in hub.datasets.{task}.splits; "
                            f"splits: {', '.join(spec.splits) or 'none'}")
    pattern = spec.files.format(split=spec.splits[split])
    files = local_matching(spec.repo, pattern) if is_local(spec.repo) else fetch_matching(spec.repo, pattern, spec.revision)
    ds = datasets.load_dataset("parquet", data_files=[str(f.path) for f in files], split="train")
    for column in (spec.image_column, spec.label_column):
        if column not in ds.features:
            raise ArtifactError(f"{where}: no column {column!r}; columns: {', '.join(ds.features)}")
    label_feature = ds.features[spec.label_column]
    names = spec.class_names or [str(n).replace("_", " ") for n in getattr(label_feature, "names", [])]
    if not names:
        raise ArtifactError(f"{where}: {spec.label_column!r} is not a ClassLabel column; give class_names in hub.datasets.{task}")
    labels = np.asarray(ds[spec.label_column], dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ArtifactError(f"{where}: labels outside 0..{len(names) - 1}")
    return LoadedSplit(ds.cast_column(spec.image_column, datasets.Image()), spec.image_column, labels, names, files, size)


def local_matching(directory: str, pattern: str) -> list[HubFile]:
    root = Path(directory).expanduser()
    paths = sorted(p for p in root.glob(pattern) if p.is_file())
    if not paths:
        raise ArtifactError(f"{root}: no file matching {pattern!r}")
    return [HubFile(p.resolve(), str(root), p.relative_to(root).as_posix(), "local", sha256_file(p)) for p in paths]


def center_crop(image, size: int) -> np.ndarray:
    """CLIP preprocessing up to the tensor: shorter side to `size` (bicubic), center crop, RGB."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / min(image.size)
    if image.size != (size, size):
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def carve_validation(labels: np.ndarray, fraction: float, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a seeded, per-class `fraction` of train held out for validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(fraction * len(idx))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
