"""Merge methods. Each is one module with a `merge(pretrained, task_vectors, params)` function."""

from . import task_arithmetic, weight_averaging

METHODS = {
    "weight_averaging": weight_averaging.merge,
    "task_arithmetic": task_arithmetic.merge,
}
