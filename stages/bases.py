"""Stage `bases`: CAT's removals for every (task, piece), from the original task vectors.

Linear weights get a removal basis B_k (Eq. 10-11), norm scales a mask (Eq. 13-14), shifts a mask
(Eq. 16-17); catmerge/cat.py has the equations. Also writes, per piece and task, the eigenvalues
(or scores) kept, the objective captured, and per linear weight and task pair the two terms of
Eq. 10 before and after trimming, for the report.

Task vectors and features are read one parameter at a time: memory holds a layer of each task.
"""

from catmerge.cli import run_stage
from catmerge.features import load_features
from catmerge.io import WeightsFile
from catmerge.layout import BASES_DIR, check_headers, checked_features, checked_pretrained, checked_task_vector
from catmerge.merging.cat import compute_removals, write_removals
from catmerge.params import load_params, resolve_device
from catmerge.task_vectors import load_task_vector


def main() -> None:
    params = load_params()
    check_headers(params.tasks)  # every task vector and features file says it is its task's: before any hashing
    pretrained = WeightsFile(checked_pretrained())
    task_vectors = [load_task_vector(pretrained, checked_task_vector(task), task) for task in params.tasks]
    paths = [checked_features(task) for task in params.tasks]
    features = [load_features(path, task) for path, task in zip(paths, params.tasks)]
    device = resolve_device(params.device, params.source).type
    pieces, removals, info, terms = compute_removals(pretrained, task_vectors, features, params.cat, [str(p) for p in paths], device)
    write_removals(BASES_DIR, params.tasks, pieces, removals, info, terms)

    linear = [r for piece in pieces if piece.family == "linear" for r in removals[piece.name]]
    kept = sum(r.basis.shape[1] for r in linear)
    print(f"bases: {len(pieces)} pieces, {len(linear)} (task, linear weight) bases, {kept} directions kept")


if __name__ == "__main__":
    run_stage("bases", main)
