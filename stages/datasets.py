"""Stage `datasets@<task>`: the task's train / val / test splits as HF parquet, plus info.json."""

import numpy as np

from catmerge.benchmark.tasks import get_task
from catmerge.cli import check_task_argument, run_stage
from catmerge.data import SPLITS, write_split
from catmerge.io import atomic_dir, write_json
from catmerge.layout import dataset_dir
from catmerge.params import load_params


def _cap(n: int, limit: int | None, seed: list[int]) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def main(task: str) -> None:
    params = load_params()
    spec = get_task(check_task_argument(params, task))
    pools = spec.build(params.data_seed)
    limits = {"train": params.datasets.max_train, "val": params.datasets.max_val, "test": params.datasets.max_test}
    counts = {}
    with atomic_dir(dataset_dir(task)) as out:
        for i, split in enumerate(SPLITS):
            pool = pools[split]
            keep = _cap(len(pool.labels), limits[split], [params.data_seed, 99, i])
            write_split(pool.images[keep], pool.labels[keep], spec.class_names, out / f"{split}.parquet")
            counts[split] = len(keep)
        write_json(
            {
                "task": task,
                "description": spec.description,
                "source": params.source,
                "class_names": spec.class_names,
                "templates": spec.templates,
                "counts": counts,
                "data_seed": params.data_seed,
            },
            out / "info.json",
        )
    print(f"{task}: {counts}")


if __name__ == "__main__":
    run_stage("datasets", main)
