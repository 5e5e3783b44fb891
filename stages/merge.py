"""Stage `merge`: one merged image tower per method in `merge.methods`."""

from catmerge.cli import run_stage
from catmerge.io import load_weights, save_weights
from catmerge.layout import BASES_DIR, PRETRAINED_TOWER, merged_path, task_vector_path
from catmerge.merging import cat, merge_method
from catmerge.params import load_params
from catmerge.task_vectors import load_task_vector


def main() -> None:
    params = load_params()
    pretrained = load_weights(PRETRAINED_TOWER)
    task_vectors = [load_task_vector(pretrained, task_vector_path(task)) for task in params.tasks]
    for method in params.merge.methods:
        if method == "cat":  # also needs the bases stage's removals
            merged = cat.merge(pretrained, task_vectors, params.cat, cat.read_removals(BASES_DIR, params.tasks))
        else:
            merged = merge_method(method)(pretrained, task_vectors, params.merge)
        save_weights(merged, merged_path(method), {"method": method, "tasks": ",".join(params.tasks)})
        print(f"merged {len(task_vectors)} task vectors with {method}")


if __name__ == "__main__":
    run_stage("merge", main)
