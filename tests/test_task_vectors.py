"""Task-vector arithmetic and the two baseline merges."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from catmerge.io import ArtifactError, load_weights
from catmerge.merging import merge_method
from catmerge.merging.task_arithmetic import TaskArithmeticParams
from catmerge.task_vectors import apply_task_vector, check_task_vector, task_vector

SHAPES = {"w": (4, 3), "b": (4,), "ln.weight": (3,)}


def random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), alpha=st.floats(0.05, 2.0))
def test_alpha_zero_is_pretrained_and_task_arithmetic_is_linear(seed, k, alpha):
    theta0 = random_state(seed)
    experts = [{n: v + 0.1 * random_state(seed + i + 1)[n] for n, v in theta0.items()} for i in range(k)]
    tvs = [task_vector(theta0, e) for e in experts]
    # alpha = 0 is the pretrained model (params.yaml refuses alpha <= 0; the method itself does not)
    zero = merge_method("task_arithmetic")(theta0, tvs, TaskArithmeticParams.model_construct(alpha=0.0))
    assert all(torch.equal(zero[n], theta0[n]) for n in theta0)
    merged = merge_method("task_arithmetic")(theta0, tvs, TaskArithmeticParams(alpha=alpha))
    for n in theta0:
        expected = theta0[n].double() + alpha * sum(tv[n].double() for tv in tvs)
        torch.testing.assert_close(merged[n].double(), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5))
def test_weight_averaging_is_the_mean_of_the_experts(seed, k):
    theta0 = random_state(seed)
    experts = [random_state(seed + 100 + i) for i in range(k)]
    merged = merge_method("weight_averaging")(theta0, [task_vector(theta0, e) for e in experts])
    for n in theta0:
        torch.testing.assert_close(merged[n], torch.stack([e[n] for e in experts]).mean(0), rtol=1e-5, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 30.0]),
    move=st.sampled_from([1e-4, 1e-1, 1.0, 10.0]),
)
def test_float64_task_vectors_give_back_the_expert_bit_for_bit(seed, scale, move):
    theta0 = random_state(seed, scale)
    expert = {k: (v + move * scale * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed + 1))) for k, v in theta0.items()}
    expert["b"][0] = 0.0  # exact zeros and sign changes included
    restored = apply_task_vector(theta0, task_vector(theta0, expert))
    for key in theta0:
        assert restored[key].dtype == torch.float32
        assert torch.equal(restored[key], expert[key]), key


def test_pretrained_plus_task_vector_gives_back_the_expert(micro_project):
    """On the real micro experts, theta_0 + T_k reproduces theta_k bit for bit."""
    theta0 = load_weights(micro_project / "data/pretrained/image_tower.safetensors")
    for task in ("mnist", "mnist_rotation", "textures"):
        expert = load_weights(micro_project / f"data/experts/{task}/expert.safetensors")
        tv = load_weights(micro_project / f"data/task_vectors/{task}.safetensors")
        assert tv.keys() == {k for k, v in theta0.items() if v.is_floating_point()}
        restored = apply_task_vector(theta0, tv)
        assert any(not torch.equal(expert[k], theta0[k]) for k in theta0), "expert identical to pretrained"
        for key in theta0:
            assert torch.equal(restored[key], expert[key]), key


def test_incompatible_expert_or_task_vector_is_refused():
    theta0 = random_state(0)
    bad = dict(theta0, w=torch.zeros(5, 3))
    with pytest.raises(ArtifactError, match=r"expert.safetensors: w is \(5, 3\)"):
        task_vector(theta0, bad, "expert.safetensors")
    with pytest.raises(ArtifactError, match=r"expert.safetensors: keys differ .*missing \['b', 'ln.weight'\]"):
        task_vector(theta0, {"w": theta0["w"]}, "expert.safetensors")
    delta = task_vector(theta0, random_state(1))
    check_task_vector(theta0, delta, "mnist.safetensors")
    with pytest.raises(ArtifactError, match=r"mnist.safetensors: w is \(3,\)"):
        check_task_vector(theta0, dict(delta, w=torch.zeros(3)), "mnist.safetensors")
    with pytest.raises(ArtifactError, match=r"mnist.safetensors: keys differ .*extra \['head'\]"):
        check_task_vector(theta0, dict(delta, head=torch.zeros(3)), "mnist.safetensors")
