"""Stage `task_vectors@<task>`: T_k = theta_k - theta_0 (float parameters, `task_vectors.dtype`)."""

import torch

from catmerge.cli import check_task_argument, run_stage
from catmerge.io import load_weights, save_weights
from catmerge.layout import PRETRAINED_TOWER, expert_dir, task_vector_path
from catmerge.params import load_params
from catmerge.task_vectors import assert_no_nonfinite, task_vector


def main(task: str) -> None:
    params = load_params()
    check_task_argument(params, task)
    pretrained = load_weights(PRETRAINED_TOWER)
    expert_path = expert_dir(task) / "expert.safetensors"
    expert = load_weights(expert_path)
    assert_no_nonfinite(expert, str(expert_path))
    delta = task_vector(pretrained, expert, str(expert_path), getattr(torch, params.task_vectors.dtype))
    save_weights(delta, task_vector_path(task), {"task": task, "dtype": params.task_vectors.dtype})
    norm = sum(float(v.double().pow(2).sum()) for v in delta.values()) ** 0.5
    base = sum(float(pretrained[k].double().pow(2).sum()) for k in delta) ** 0.5
    print(f"{task}: ||T_k|| = {norm:.3f} ({100 * norm / base:.1f}% of ||theta_0||)")


if __name__ == "__main__":
    run_stage("task_vectors", main)
