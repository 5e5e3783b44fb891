"""Task vectors: T_k = theta_k - theta_0 over the floating-point parameters.

Stored in float64 by default: the difference of two float32 numbers is exact in float64
(whenever their exponents differ by less than 29), so theta_0 + T_k gives back theta_k bit for
bit. In float32, about 2% of the entries of a fine-tuned tower come back off by many ulps (weights
near zero that moved far), which makes "alpha = 1 on one task is the expert" false.
"""

from __future__ import annotations

import torch

from .io import ArtifactError, StateDict


def check_compatible(pretrained: StateDict, expert: StateDict, expert_name: str = "expert") -> None:
    """The expert has exactly theta_0's keys, shapes and dtypes."""
    _check_keys(set(pretrained), expert, expert_name)
    for key, value in pretrained.items():
        if expert[key].shape != value.shape or expert[key].dtype != value.dtype:
            raise ArtifactError(
                f"{expert_name}: {key} is {tuple(expert[key].shape)} {expert[key].dtype}, "
                f"pretrained is {tuple(value.shape)} {value.dtype}"
            )


def check_task_vector(pretrained: StateDict, delta: StateDict, name: str = "task vector") -> None:
    """The task vector covers exactly theta_0's floating-point parameters, shape for shape."""
    _check_keys({k for k, v in pretrained.items() if v.is_floating_point()}, delta, name)
    for key, value in delta.items():
        if value.shape != pretrained[key].shape or not value.is_floating_point():
            raise ArtifactError(
                f"{name}: {key} is {tuple(value.shape)} {value.dtype}, pretrained is {tuple(pretrained[key].shape)}"
            )


def _check_keys(expected: set[str], tensors: StateDict, name: str) -> None:
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        raise ArtifactError(f"{name}: keys differ from the pretrained model (missing {missing[:5]}, extra {extra[:5]})")


def task_vector(
    pretrained: StateDict, expert: StateDict, expert_name: str = "expert", dtype: torch.dtype = torch.float64
) -> StateDict:
    check_compatible(pretrained, expert, expert_name)
    return {k: expert[k].to(dtype) - v.to(dtype) for k, v in pretrained.items() if v.is_floating_point()}


def load_task_vector(pretrained: StateDict, path) -> StateDict:
    """A task vector file, checked against theta_0 (keys, shapes, float dtypes); errors name the file."""
    from .io import load_weights

    delta = load_weights(path)
    check_task_vector(pretrained, delta, str(path))
    return delta


def apply_task_vector(pretrained: StateDict, delta: StateDict, scale: float = 1.0) -> StateDict:
    """theta_0 + scale * delta, computed in the delta's precision and returned in theta_0's dtypes;
    parameters without a delta are copied from theta_0."""
    out = {}
    for key, value in pretrained.items():
        if key in delta:
            d = delta[key]
            out[key] = (value.to(d.dtype) + (d if scale == 1.0 else scale * d)).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def sum_task_vectors(task_vectors: list[StateDict]) -> StateDict:
    total = {k: v.clone() for k, v in task_vectors[0].items()}
    for tv in task_vectors[1:]:
        for k in total:
            total[k] += tv[k]
    return total


def assert_no_nonfinite(tensors: StateDict, name: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ArtifactError(f"{name}: {key} contains NaN or Inf")
