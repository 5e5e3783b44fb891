"""Stage `datasets@<task>`: the task's train / val / test splits as HF parquet, plus info.json.

source `builtin`: the packaged images of the offline benchmark (catmerge/benchmark/).
source `hf`: the task's hub dataset (catmerge/hub_datasets.py), validation carved from train with
`data_seed`, images resized and center-cropped to the model's input size.
"""

import numpy as np

from catmerge.cli import check_task_argument, run_stage
from catmerge.data import SPLITS, write_split
from catmerge.io import atomic_dir, file_record, write_json
from catmerge.layout import dataset_dir
from catmerge.params import load_params


def _cap(n: int, limit: int | None, seed: list[int]) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def builtin_splits(params, task: str) -> tuple[dict, dict]:
    from catmerge.benchmark.tasks import get_task

    spec = get_task(task)
    pools = spec.build(params.data_seed)
    info = {"description": spec.description, "class_names": spec.class_names, "templates": spec.templates,
            "image_pool": spec.image_pool}
    return {s: (pools[s].images, pools[s].labels) for s in SPLITS}, info


def hub_splits(params, task: str) -> tuple[dict, dict]:
    from catmerge.configs import model_config
    from catmerge.hub_datasets import carve_validation, hub_task, load_split

    spec = hub_task(task, params.hub.datasets.get(task))
    size = model_config(params.model)["vision_cfg"]["image_size"]
    train, test = load_split(task, spec, "train", size), load_split(task, spec, "test", size)
    if train.class_names != test.class_names:
        raise ValueError(f"dataset {spec.repo}: train and test splits name different classes")
    keep, val = carve_validation(train.labels, params.hub.val_fraction, [params.data_seed, 98])
    rows = {"train": (train, keep), "val": (train, val), "test": (test, np.arange(len(test.labels)))}
    limits = {"train": params.datasets.max_train, "val": params.datasets.max_val, "test": params.datasets.max_test}
    splits = {}
    for i, name in enumerate(SPLITS):  # caps first (the same draw main() makes), so only kept images are decoded
        source, chosen = rows[name]
        chosen = chosen[_cap(len(chosen), limits[name], [params.data_seed, 99, i])]
        splits[name] = (source.images(chosen), source.labels[chosen])
    info = {"description": f"{spec.repo} (hub)", "image_pool": spec.repo, "class_names": train.class_names, "templates": spec.templates,
            "hub_files": [f.record("dataset") for f in train.files + test.files], "image_size": size,
            "val_fraction": params.hub.val_fraction}
    return splits, info


def main(task: str) -> None:
    params = load_params()
    check_task_argument(params, task)
    splits, info = (builtin_splits if params.source == "builtin" else hub_splits)(params, task)
    limits = {"train": params.datasets.max_train, "val": params.datasets.max_val, "test": params.datasets.max_test}
    counts = {}
    with atomic_dir(dataset_dir(task)) as out:
        for i, split in enumerate(SPLITS):
            images, labels = splits[split]
            keep = _cap(len(labels), limits[split], [params.data_seed, 99, i])
            write_split(images[keep], labels[keep], info["class_names"], out / f"{split}.parquet")
            counts[split] = len(keep)
        head = {"task": task, "description": info.pop("description"), "source": params.source}
        write_json({**head, **info, "counts": counts, "data_seed": params.data_seed}, out / "info.json")
        written = [out / f"{split}.parquet" for split in SPLITS] + [out / "info.json"]
        write_json({"task": task, "files": [file_record(p, out, f"datasets:{params.source}") for p in written]}, out / "manifest.json")
    print(f"{task}: {counts}")


if __name__ == "__main__":
    run_stage("datasets", main)
