"""Task Arithmetic (paper Eq. 2): theta = theta_0 + alpha * sum_k T_k."""

from ..io import StateDict
from ..task_vectors import apply_task_vector, sum_task_vectors


def merged_vector(task_vectors: list[StateDict], params=None) -> StateDict:
    return sum_task_vectors(task_vectors)


def merge(pretrained: StateDict, task_vectors: list[StateDict], params) -> StateDict:
    return apply_task_vector(pretrained, merged_vector(task_vectors), params.alpha)
