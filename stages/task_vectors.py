"""Stage `task_vectors@<task>`: T_k = theta_k - theta_0 (float parameters, `task_vectors.dtype`).

Read, subtracted and written one tensor at a time: memory holds a layer, not a model."""

import torch

from catmerge.cli import check_task_argument, run_stage
from catmerge.io import LazyWeights, WeightsFile, save_weights, write_sidecar_manifest
from catmerge.layout import checked_expert, checked_pretrained, task_vector_path
from catmerge.params import load_params
from catmerge.task_vectors import task_vector


def main(task: str) -> None:
    params = load_params()
    check_task_argument(params, task)
    pretrained = WeightsFile(checked_pretrained())
    expert_path = checked_expert(task)
    delta = task_vector(pretrained, WeightsFile(expert_path), str(expert_path), getattr(torch, params.task_vectors.dtype))
    squares = {"delta": 0.0, "base": 0.0}

    def measured(key: str) -> torch.Tensor:
        value = delta[key]
        squares["delta"] += float(value.double().square().sum())
        squares["base"] += float(pretrained[key].double().square().sum())
        return value

    meta = {"task": task, "dtype": params.task_vectors.dtype}
    save_weights(LazyWeights(delta.specs, measured), task_vector_path(task), meta)
    write_sidecar_manifest(task_vector_path(task), "task_vectors", **meta)
    norm, base = squares["delta"] ** 0.5, squares["base"] ** 0.5
    print(f"{task}: ||T_k|| = {norm:.3f} ({100 * norm / base:.1f}% of ||theta_0||)")


if __name__ == "__main__":
    run_stage("task_vectors", main)
