"""Weight averaging: the mean of the experts, theta_0 + (1/K) sum_k T_k. No hyperparameters."""

from ..io import StateDict
from ..task_vectors import apply_task_vector, sum_task_vectors

PARAMS = None
NEEDS = frozenset()


def merge(pretrained: StateDict, task_vectors: list[StateDict], params=None, inputs=None) -> StateDict:
    return apply_task_vector(pretrained, sum_task_vectors(task_vectors), 1.0 / len(task_vectors))
