"""Stage `features@<task>`: the layer inputs CAT needs from task k, on a few unlabeled exemplars.

Exemplars: `cat.exemplars` train images drawn with a seed from `data_seed` and the task name,
evaluation preprocessing, no labels. Model: task k's own, theta_0 + cat.feature_alpha * T_k.
Every token of every exemplar is a row; stored as rows, Gram matrix or sums of squares
(catmerge/features.py, docs/artifacts.md).
"""

from catmerge.cli import check_task_argument, run_stage
from catmerge.data import read_split
from catmerge.features import capture, exemplar_indices
from catmerge.io import WeightsFile, save_weights, write_sidecar_manifest
from catmerge.layout import (
    check_task_vector_header,
    checked_pretrained,
    checked_split,
    checked_task_vector,
    features_path,
)
from catmerge.models import create_image_tower, resolve_device
from catmerge.params import ParamsError, load_params
from catmerge.task_vectors import apply_task_vector, load_task_vector


def main(task: str) -> None:
    params = load_params()
    check_task_argument(params, task)
    check_task_vector_header(task)  # its task and dtype, from the header: before anything is hashed
    pretrained = WeightsFile(checked_pretrained())  # read a tensor at a time, into the tower
    delta = load_task_vector(pretrained, checked_task_vector(task), task)  # cheap checks before the images are decoded
    train_path = checked_split(task, "train")
    train = read_split(train_path)
    count = params.cat.exemplars
    if count > len(train.labels):
        raise ParamsError(f"cat.exemplars = {count}: {train_path} has only {len(train.labels)} images")
    chosen = exemplar_indices(count, len(train.labels), params.data_seed, task)
    tower = create_image_tower(params.model).to(resolve_device(params.device, params.source))
    tensors, pieces, info = capture(tower, apply_task_vector(pretrained, delta, params.cat.feature_alpha), train.images[chosen])
    needed = {p.input for p in pieces if p.input is not None}
    rows = info["rows"]
    meta = {"task": task, "adapter": info["adapter"], "exemplars": chosen.tolist(), "data_seed": params.data_seed, "rows": rows,
            "feature_alpha": params.cat.feature_alpha}  # data_seed: the seed the exemplars were drawn with
    save_weights(tensors, features_path(task), meta)
    write_sidecar_manifest(features_path(task), "features", task=task)
    print(f"{task}: {count} exemplars {chosen.tolist()}, {rows} rows per layer, {len(needed)} layer inputs")


if __name__ == "__main__":
    run_stage("features", main)
