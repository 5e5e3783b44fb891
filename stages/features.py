"""Stage `features@<task>`: the layer inputs CAT needs from task k, on a few unlabeled exemplars.

Exemplars: `cat.exemplars` train images drawn with a seed from `data_seed` and the task name,
evaluation preprocessing, no labels. Model: task k's own, theta_0 + cat.feature_alpha * T_k.
Every token of every exemplar is a row; stored as rows, Gram matrix or sums of squares
(catmerge/features.py, docs/artifacts.md).
"""

import torch

from catmerge.adapters import adapter_for
from catmerge.benchmark.training import task_seed
from catmerge.cli import check_task_argument, run_stage
from catmerge.data import read_split
from catmerge.features import compress
from catmerge.io import load_weights, save_weights
from catmerge.layout import PRETRAINED_TOWER, dataset_dir, features_path, task_vector_path
from catmerge.models import create_image_tower, normalize_images
from catmerge.params import ParamsError, load_params
from catmerge.task_vectors import apply_task_vector, load_task_vector


def main(task: str) -> None:
    params = load_params()
    check_task_argument(params, task)
    train_path = dataset_dir(task) / "train.parquet"
    train = read_split(train_path)
    count = params.cat.exemplars
    if count > len(train.labels):
        raise ParamsError(f"cat.exemplars = {count}: {train_path} has only {len(train.labels)} images")
    generator = torch.Generator().manual_seed(task_seed(params.data_seed, task))
    chosen = torch.randperm(len(train.labels), generator=generator)[:count].sort().values

    pretrained = load_weights(PRETRAINED_TOWER)
    delta = load_task_vector(pretrained, task_vector_path(task))
    tower = create_image_tower(params.model)
    tower.load_state_dict(apply_task_vector(pretrained, delta, params.cat.feature_alpha))
    adapter = adapter_for(tower)
    captured = adapter.capture_inputs(tower, normalize_images(train.images[chosen]))

    shapes = {k: tuple(v.shape) for k, v in pretrained.items() if v.is_floating_point()}
    pieces = adapter.pieces(shapes, qkv="fused")
    needed = {p.input for p in pieces if p.input is not None}
    missing = sorted(needed - set(captured))
    if missing:
        raise RuntimeError(f"{adapter.NAME} adapter captured no rows for {missing}")
    tensors = compress(captured, {p.input for p in pieces if p.family == "norm_scale"})
    rows = max(x.shape[0] for x in captured.values())  # tokens x exemplars (the patch embedding sees no class token)
    meta = {"task": task, "adapter": adapter.NAME, "exemplars": chosen.tolist(), "rows": rows, "feature_alpha": params.cat.feature_alpha}
    save_weights(tensors, features_path(task), meta)
    print(f"{task}: {count} exemplars {chosen.tolist()}, {rows} rows per layer, {len(needed)} layer inputs")


if __name__ == "__main__":
    run_stage("features", main)
