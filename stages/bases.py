"""Stage `bases`: CAT's removals for every (task, piece), from the original task vectors.

Linear weights get a removal basis B_k (Eq. 10-11), norm scales a mask (Eq. 13-14), shifts a mask
(Eq. 16-17); catmerge/cat.py has the equations. Also writes, per piece and task, the eigenvalues
(or scores) kept and the objective captured, for diagnostics.
"""

import dataclasses

from catmerge import cat
from catmerge.adapters import get_adapter
from catmerge.cli import run_stage
from catmerge.features import load_features
from catmerge.io import ArtifactError, load_weights
from catmerge.layout import BASES_DIR, PRETRAINED_TOWER, features_path, task_vector_path
from catmerge.merging.cat import write_removals
from catmerge.params import ParamsError, load_params
from catmerge.progress import progress
from catmerge.task_vectors import load_task_vector


def main() -> None:
    params = load_params()
    p = params.cat
    pretrained = load_weights(PRETRAINED_TOWER)
    task_vectors = [load_task_vector(pretrained, task_vector_path(task)) for task in params.tasks]
    features = [load_features(features_path(task)) for task in params.tasks]
    adapter_names = {meta.get("adapter") for _, _, meta in features}
    if len(adapter_names) != 1:
        raise ArtifactError(f"features of {params.tasks} come from different adapters: {sorted(map(str, adapter_names))}")
    adapter = get_adapter(adapter_names.pop())

    shapes = {k: tuple(v.shape) for k, v in pretrained.items() if v.is_floating_point()}
    pieces = adapter.pieces(shapes, p.qkv, p.conv)
    for piece in pieces:
        width = piece.stop - piece.start
        if piece.family == "linear" and p.c >= width:
            raise ParamsError(f"cat.c = {p.c}: must be below the output width {width} of {piece.name}")
        for key, value in (("c_norm", p.c_norm), ("c_shift", p.c_shift)):
            if value is not None and value > width and piece.family == ("norm_scale" if key == "c_norm" else "shift"):
                raise ParamsError(f"cat.{key} = {value}: more than the {width} coordinates of {piece.name}")
        for task, (linear, sums, _) in zip(params.tasks, features):
            if piece.input is not None and piece.input not in (linear if piece.family == "linear" else sums):
                raise ArtifactError(f"{features_path(task)}: no features for {piece.input} (needed by {piece.name})")

    settings = cat.Settings(
        c=p.c,
        lam=p.lambda_,
        c_norm=p.c if p.c_norm is None else p.c_norm,
        lambda_norm=p.lambda_ if p.lambda_norm is None else p.lambda_norm,
        c_shift=p.c if p.c_shift is None else p.c_shift,
        drop_nonpositive=p.drop_nonpositive,
        shift_score=p.shift_score,
    )
    inputs = [(linear, sums) for linear, sums, _ in features]
    removals = cat.model_removals(progress(pieces, "bases"), task_vectors, inputs, settings)
    # only the params this stage reads (dvc.yaml lists the same), with the defaults resolved
    resolved = dataclasses.asdict(settings)
    resolved["lambda"] = resolved.pop("lam")
    info = {"adapter": adapter.NAME, "params": {**resolved, "qkv": p.qkv, "conv": p.conv}}
    write_removals(BASES_DIR, params.tasks, pieces, removals, info)

    linear = [r for piece in pieces if piece.family == "linear" for r in removals[piece.name]]
    kept = sum(r.basis.shape[1] for r in linear)
    print(f"bases: {len(pieces)} pieces, {len(linear)} (task, linear weight) bases, {kept} directions kept")


if __name__ == "__main__":
    run_stage("bases", main)
