"""Task vectors: T_k = theta_k - theta_0 over the floating-point parameters.

Stored in float64 by default: the difference of two float32 numbers is exact in float64
(whenever their exponents differ by less than 29), so theta_0 + T_k gives back theta_k bit for
bit. In float32, about 2% of the entries of a fine-tuned tower come back off by many ulps (weights
near zero that moved far), which makes "alpha = 1 on one task is the expert" false.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .io import ArtifactError, LazyWeights, Spec, WeightsFile, specs_of

Weights = Mapping[str, torch.Tensor]  # a state dict, or a file / computation read one tensor at a time


def is_lazy(*weights) -> bool:
    """Whether any input (a mapping, or a list of them) is read or computed one tensor at a time."""
    flat = [w for item in weights for w in (item if isinstance(item, (list, tuple)) else [item])]
    return any(isinstance(w, (WeightsFile, LazyWeights)) for w in flat)


def per_tensor(specs: dict[str, Spec], compute: Callable[[str], torch.Tensor], *inputs) -> Weights:
    """`compute(key)` for every key of `specs`. With all inputs in memory: a dict, computed now.
    With any input lazy (a file read tensor by tensor): a LazyWeights, each tensor computed when it
    is read, so a merged model can be written without ever being whole in memory. The same
    `compute` runs either way: both paths give the same bytes."""
    if is_lazy(*inputs):
        return LazyWeights(specs, compute)
    return {key: compute(key) for key in specs}


def check_compatible(pretrained: Weights, expert: Weights, expert_name: str = "expert") -> None:
    """The expert has exactly theta_0's keys, shapes and dtypes (read from headers, not data)."""
    base, other = specs_of(pretrained), specs_of(expert)
    _check_keys(set(base), other, expert_name)
    for key, (dtype, shape) in base.items():
        if other[key] != (dtype, shape):
            raise ArtifactError(f"{expert_name}: {key} is {other[key][1]} {other[key][0]}, pretrained is {shape} {dtype}")


def check_task_vector(pretrained: Weights, delta: Weights, name: str = "task vector") -> None:
    """The task vector covers exactly theta_0's floating-point parameters, shape for shape."""
    base, other = specs_of(pretrained), specs_of(delta)
    _check_keys({k for k, (dtype, _) in base.items() if dtype.is_floating_point}, other, name)
    for key, (dtype, shape) in other.items():
        if shape != base[key][1] or not dtype.is_floating_point:
            raise ArtifactError(f"{name}: {key} is {shape} {dtype}, pretrained is {base[key][1]}")


def _check_keys(expected: set[str], tensors: Weights, name: str) -> None:
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        raise ArtifactError(f"{name}: keys differ from the pretrained model (missing {missing[:5]}, extra {extra[:5]})")


def task_vector(pretrained: Weights, expert: Weights, expert_name: str = "expert", dtype: torch.dtype = torch.float64) -> Weights:
    """T_k = theta_k - theta_0 over the floating-point parameters; NaN or Inf in either model is
    refused, tensor by tensor as each is read, naming the model's file (or "pretrained")."""
    check_compatible(pretrained, expert, expert_name)
    pretrained_name = str(getattr(pretrained, "path", "pretrained"))

    def delta(key: str) -> torch.Tensor:
        value = _finite(expert[key], expert_name, key)
        return value.to(dtype) - _finite(pretrained[key], pretrained_name, key).to(dtype)

    specs = {k: (dtype, shape) for k, (d, shape) in specs_of(pretrained).items() if d.is_floating_point}
    return per_tensor(specs, delta, pretrained, expert)


def _finite(value: torch.Tensor, name: str, key: str) -> torch.Tensor:
    if not torch.isfinite(value).all():
        raise ArtifactError(f"{name}: {key} contains NaN or Inf")
    return value


def load_task_vector(pretrained: Weights, path, task: str | None = None) -> WeightsFile:
    """A task vector file, checked against theta_0 (keys, shapes, float dtypes) and against its own
    metadata (`task` when given; every tensor of the dtype it records) from its header; read one
    tensor at a time. Errors name the file."""
    delta = WeightsFile(path)
    check_own_claims(delta, task)
    check_task_vector(pretrained, delta, str(path))
    return delta


def check_own_claims(delta: WeightsFile, task: str | None = None) -> None:
    """What a task vector file says of itself, checked from its header alone: its metadata says
    `task` (when given), and every tensor is of the dtype the metadata records (a file rewritten in
    float16 still claiming float64 is refused, naming the first tensor that differs)."""
    if task is not None:
        delta.check_claims(task=task)
    recorded = delta.metadata.get("dtype")
    if recorded is not None:
        if not isinstance(recorded, str) or not isinstance(getattr(torch, recorded, None), torch.dtype):
            raise ArtifactError(f"{delta.path}: its metadata records dtype {recorded!r}, not a torch dtype")
        delta.check_dtypes(getattr(torch, recorded), "its metadata")


def apply_task_vector(pretrained: Weights, delta: Weights, scale: float = 1.0) -> Weights:
    """theta_0 + scale * delta, computed in the delta's precision and returned in theta_0's dtypes;
    parameters without a delta are copied from theta_0."""

    def applied(key: str) -> torch.Tensor:
        value = pretrained[key]
        if key not in delta:
            return value.clone()
        d = delta[key]
        return (value.to(d.dtype) + (d if scale == 1.0 else scale * d)).to(value.dtype)

    return per_tensor(specs_of(pretrained), applied, pretrained, delta)


def sum_task_vectors(task_vectors: list[Weights]) -> Weights:
    """sum_k T_k, added in task order."""

    def total(key: str) -> torch.Tensor:
        out = task_vectors[0][key].clone()
        for tv in task_vectors[1:]:
            out += tv[key]
        return out

    return per_tensor(specs_of(task_vectors[0]), total, task_vectors)
