"""Task Arithmetic (Ilharco et al., ICLR 2023; CAT paper Eq. 2): theta = theta_0 + alpha * sum_k T_k."""

from pydantic import Field

from ..io import StateDict
from ..params_base import Strict
from ..task_vectors import sum_task_vectors


class TaskArithmeticParams(Strict):
    alpha: float = Field(default=0.3, gt=0, description="scaling of the summed task vectors (the authors choose it on val)")


PARAMS = TaskArithmeticParams
NEEDS = frozenset()


def merged_vector(task_vectors: list[StateDict], params=None, inputs=None) -> StateDict:
    return sum_task_vectors(task_vectors)
