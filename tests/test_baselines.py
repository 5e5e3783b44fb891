"""TIES, RegMean and PCB merging (catmerge/merging/{ties,regmean,pcb}.py): hand-computed examples
and properties that hold for all inputs. TSV-M and Iso-C/CTS are in test_spectral_methods.py; the
comparison with FusionBench's code is test_oracle_fusionbench.py."""

from __future__ import annotations

from math import exp

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from catmerge.adapters import Piece
from catmerge.cat import LayerInput
from catmerge.io import ArtifactError
from catmerge.merging import METHOD_NAMES, MergeInputs, merge_method, method_module, pcb, ties
from catmerge.merging.pcb import PcbParams
from catmerge.merging.regmean import RegMeanParams
from catmerge.merging.ties import TiesParams

SETTINGS = settings(max_examples=25, deadline=None)
F64 = torch.float64


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


ties_merge, pcb_merge = merge_method("ties"), merge_method("pcb")


def regmean_merge(theta0, deltas, params, pieces, layer_inputs, names=None):
    return merge_method("regmean")(theta0, deltas, params, MergeInputs(pieces=pieces, layer_inputs=layer_inputs, names=names))


def test_every_method_module_has_the_one_shape():
    assert {"weight_averaging", "task_arithmetic", "ties", "regmean", "pcb", "tsv_m", "iso_c", "iso_cts", "cat"} <= set(METHOD_NAMES)
    for name in METHOD_NAMES:
        module = method_module(name)  # checks PARAMS, NEEDS and a merge function
        assert module.PARAMS is None or module.PARAMS().model_dump()  # every param has a default
    assert method_module("ties") is ties and method_module("regmean").NEEDS == {"layer_inputs"}
    with pytest.raises(KeyError, match="unknown merge method 'nope'; known: cat, "):
        method_module("nope")


# ---- TIES ------------------------------------------------------------------------------------


def test_ties_hand_example():
    # k = 50% of 6 entries: 3 kept per task.
    t1 = torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 0.1]])
    t2 = torch.tensor([[-5.0, 1.0, 1.0], [0.5, -2.0, 0.3]])  # |1| at (0,1) and (0,2) tie: (0,1) wins
    t3 = torch.tensor([[1.0, 2.0, 0.1], [-3.0, -1.0, 0.2]])  # |1| at (0,0) and (1,1) tie: (0,0) wins
    trimmed = [
        torch.tensor([[3.0, 0.0, 0.0], [2.0, -4.0, 0.0]]),
        torch.tensor([[-5.0, 1.0, 0.0], [0.0, -2.0, 0.0]]),
        torch.tensor([[1.0, 2.0, 0.0], [-3.0, 0.0, 0.0]]),
    ]
    for t, expected in zip((t1, t2, t3), trimmed):
        assert torch.equal(ties.trim(t, 50.0), expected)
    # mass = [[-1, 3, 0], [-1, -6, 0]] -> elected signs [[-, +, none], [-, -, none]]
    # (0,0): 3, -5, 1 disagree; only -5 has the elected sign -> -5
    # (0,1): 1 and 2 -> 1.5;  (1,0): only -3 -> -3;  (1,1): -4 and -2 -> -3
    # (0,2), (1,2): no task survives the trim -> 0
    disjoint = torch.tensor([[-5.0, 1.5, 0.0], [-3.0, -3.0, 0.0]])
    theta0 = {"w": torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]]), "steps": torch.tensor(7)}
    out = ties_merge(theta0, [{"w": t.double()} for t in (t1, t2, t3)], TiesParams(k=50, alpha=0.5))
    assert out["w"].dtype == torch.float32 and out["steps"].dtype == torch.int64
    assert torch.equal(out["w"], theta0["w"] + 0.5 * disjoint)
    assert torch.equal(out["steps"], theta0["steps"])


def test_ties_exact_mass_tie_takes_the_majority_sign_as_published():
    theta0 = {"w": torch.tensor([1.0, 1.0])}
    out = ties_merge(theta0, [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([-2.0, 3.0])}], TiesParams(k=100, alpha=1.0))
    # entry 0: 2 - 2 = 0 elects no sign itself; the model's elected signs sum to +1, so it takes +: mean(2) = 2
    assert torch.equal(out["w"], torch.tensor([3.0, 3.0]))
    # no majority either (the signs sum to 0): the entry keeps theta_0
    out = ties_merge({"w": torch.tensor([1.0])}, [{"w": torch.tensor([2.0])}, {"w": torch.tensor([-2.0])}], TiesParams(k=100))
    assert torch.equal(out["w"], torch.tensor([1.0]))


def test_ties_trims_over_the_whole_task_vector_by_default():
    theta0 = {"a": torch.zeros(4, dtype=F64), "b": torch.zeros(4, dtype=F64)}
    delta = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0], dtype=F64), "b": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)}
    published = ties_merge(theta0, [delta], TiesParams(k=50))  # the top 4 of all 8 entries: all of `a`
    assert torch.equal(published["a"], delta["a"]) and torch.equal(published["b"], torch.zeros(4, dtype=F64))
    per_tensor = ties_merge(theta0, [delta], TiesParams(k=50, trim="per_tensor"))  # the top 2 of each
    assert torch.equal(per_tensor["a"], torch.tensor([10.0, 9.0, 0.0, 0.0], dtype=F64))
    assert torch.equal(per_tensor["b"], torch.tensor([0.0, 0.0, 3.0, 4.0], dtype=F64))


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.floats(0.5, 100.0), levels=st.sampled_from([0, 3, 50]))
def test_global_trim_is_the_trim_of_the_flattened_vector(seed, k, levels):
    """The streamed threshold (a bucket histogram, then one bucket) keeps exactly what trimming the
    concatenated vector keeps, ties at the threshold included (levels: few distinct magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (7, 5), "b": (11,), "c": (3, 2, 4)}
    if levels:
        delta = {key: (torch.randint(-levels, levels + 1, shape, generator=g) * 0.25).to(F64) for key, shape in shapes.items()}
    else:
        delta = {key: randn(g, *shape) * torch.exp(3 * randn(g, *shape)) for key, shape in shapes.items()}
    flat = ties.trim(torch.cat([v.reshape(-1) for v in delta.values()]), k)
    limits = ties.global_thresholds(delta, list(delta), k)
    streamed = torch.cat([ties.trim_at(delta[key], *limits[key]).reshape(-1) for key in delta])
    assert torch.equal(streamed, flat)
    assert int((streamed != 0).sum()) <= ties.kept_count(k, flat.numel())


def test_ties_kept_count_rounds_up():
    assert ties.kept_count(20, 6) == 2  # 1.2 -> 2
    assert ties.kept_count(20, 5) == 1
    assert ties.kept_count(16.1, 1000) == 161  # not ceil(161.00000000000003)
    assert ties.kept_count(0.001, 10) == 1  # at least one entry survives
    assert ties.kept_count(100, 7) == 7
    # all magnitudes equal: exactly the count survives, lowest indices first
    assert torch.equal(
        ties.trim(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]), 40), torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0])
    )


@SETTINGS
@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 4), alpha=st.floats(0.1, 3.0))
def test_ties_full_k_with_agreeing_signs_is_the_scaled_mean(seed, tasks, alpha):
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(randn(g, 4, 5) > 0, 1.0, -1.0).to(F64)
    deltas = [{"w": sign * (0.1 + torch.rand(4, 5, generator=g, dtype=F64))} for _ in range(tasks)]
    theta0 = {"w": randn(g, 4, 5)}
    out = ties_merge(theta0, deltas, TiesParams(k=100, alpha=alpha))
    mean = sum(d["w"] for d in deltas) / tasks
    torch.testing.assert_close(out["w"], theta0["w"] + alpha * mean, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.floats(1.0, 100.0), alpha=st.floats(0.1, 3.0))
def test_ties_alpha_scales_linearly(seed, k, alpha):
    g = torch.Generator().manual_seed(seed)
    theta0 = {"w": randn(g, 3, 7), "b": randn(g, 7)}
    deltas = [{key: randn(g, *v.shape) for key, v in theta0.items()} for _ in range(3)]
    one = ties_merge(theta0, deltas, TiesParams(k=k, alpha=1.0))
    scaled = ties_merge(theta0, deltas, TiesParams(k=k, alpha=alpha))
    for key, start in theta0.items():
        torch.testing.assert_close(scaled[key] - start, alpha * (one[key] - start), rtol=1e-10, atol=1e-12)


# ---- RegMean ---------------------------------------------------------------------------------


def linear_model(g: torch.Generator, d_out: int, d_in: int, dtype=F64):
    theta0 = {"w": randn(g, d_out, d_in).to(dtype), "b": randn(g, d_out).to(dtype), "n": torch.tensor(3)}
    pieces = [
        Piece("w", "w", "linear", "x", 0, d_out),
        Piece("b", "b", "shift", None, 0, d_out),
        Piece("n", "n", "other", None, 0, 0),
    ]
    return theta0, pieces


def deltas_of(g: torch.Generator, theta0, tasks: int):
    return [{k: randn(g, *v.shape) for k, v in theta0.items() if v.is_floating_point()} for _ in range(tasks)]


regmean_layers = st.tuples(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))


@SETTINGS
@given(layer=regmean_layers)
def test_regmean_is_the_least_squares_weight(layer):
    seed, tasks, d_out, d_in = layer
    g = torch.Generator().manual_seed(seed)
    theta0, pieces = linear_model(g, d_out, d_in)
    deltas = deltas_of(g, theta0, tasks)
    xs = [randn(g, d_in + 2, d_in) for _ in range(tasks)]  # full column rank stacked
    out = regmean_merge(
        theta0, deltas, RegMeanParams(nondiagonal_scale=1.0), pieces, [{"x": LayerInput(rows=x)} for x in xs]
    )
    targets = torch.cat([x @ (theta0["w"] + d["w"]).T for x, d in zip(xs, deltas)])
    expected = torch.linalg.lstsq(torch.cat(xs), targets).solution.T
    torch.testing.assert_close(out["w"], expected, rtol=1e-9, atol=1e-9)


def test_regmean_diagonal_hand_example():
    # G_1 = X_1^T X_1 = [[2, 1], [1, 2]] -> diag (2, 2); G_2 = [[4, 0], [0, 0]] -> diag (4, 0)
    x1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    x2 = torch.tensor([[2.0, 0.0]], dtype=F64)
    theta0 = {"w": torch.zeros(1, 2, dtype=F64)}
    deltas = [{"w": torch.tensor([[1.0, 1.0]], dtype=F64)}, {"w": torch.tensor([[4.0, 7.0]], dtype=F64)}]
    pieces = [Piece("w", "w", "linear", "x", 0, 1)]
    out = regmean_merge(
        theta0,
        deltas,
        RegMeanParams(nondiagonal_scale=0.0),
        pieces,
        [{"x": LayerInput(rows=x1)}, {"x": LayerInput(rows=x2)}],
    )
    # column 0: (2*1 + 4*4) / (2 + 4) = 3;  column 1: (2*1 + 0*7) / (2 + 0) = 1
    torch.testing.assert_close(out["w"], torch.tensor([[3.0, 1.0]], dtype=F64), rtol=0, atol=1e-12)


def test_regmean_half_scaled_off_diagonals_hand_example():
    # s = 0.5: G~_1 = [[2, 0.5], [0.5, 3]] from G_1 = [[2, 1], [1, 3]]; G~_2 = [[1, 0.25], [0.25, 1]]
    # T* = (T_1 G~_1 + T_2 G~_2)(G~_1 + G~_2)^-1 = [2.25, 1.5] [[3, 0.75], [0.75, 4]]^-1 = [42/61, 15/61]
    theta0 = {"w": torch.tensor([[1.0, -1.0]], dtype=F64), "b": torch.tensor([0.0], dtype=F64)}
    deltas = [{"w": torch.tensor([[1.0, 0.0]], dtype=F64), "b": torch.tensor([1.0], dtype=F64)},
              {"w": torch.tensor([[0.0, 1.0]], dtype=F64), "b": torch.tensor([3.0], dtype=F64)}]
    grams = [{"x": LayerInput(gram=torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64))},
             {"x": LayerInput(gram=torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=F64))}]
    pieces = [Piece("w", "w", "linear", "x", 0, 1)]
    out = regmean_merge(theta0, deltas, RegMeanParams(nondiagonal_scale=0.5, alpha=2.0), pieces, grams)
    expected_w = torch.tensor([[1.0 + 2.0 * 42 / 61, -1.0 + 2.0 * 15 / 61]], dtype=F64)
    torch.testing.assert_close(out["w"], expected_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["b"], torch.tensor([2.0 * 2.0], dtype=F64), rtol=0, atol=1e-12)  # alpha * mean


@SETTINGS
@given(layer=regmean_layers)
def test_regmean_without_off_diagonals_is_the_per_column_weighted_mean(layer):
    seed, tasks, d_out, d_in = layer
    g = torch.Generator().manual_seed(seed)
    theta0, pieces = linear_model(g, d_out, d_in)
    deltas = deltas_of(g, theta0, tasks)
    xs = [randn(g, 3, d_in) for _ in range(tasks)]
    out = regmean_merge(
        theta0, deltas, RegMeanParams(nondiagonal_scale=0.0), pieces, [{"x": LayerInput(rows=x)} for x in xs]
    )
    diags = [(x * x).sum(dim=0) for x in xs]  # G_i[jj]
    weights = [theta0["w"] + d["w"] for d in deltas]
    expected = sum(dg * w for dg, w in zip(diags, weights)) / sum(diags)
    torch.testing.assert_close(out["w"], expected, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(layer=regmean_layers, scale=st.floats(0.0, 1.0))
def test_regmean_rows_and_gram_agree_and_identical_experts_come_back(layer, scale):
    seed, tasks, d_out, d_in = layer
    g = torch.Generator().manual_seed(seed)
    theta0, pieces = linear_model(g, d_out, d_in)
    xs = [randn(g, d_in + 1, d_in) for _ in range(tasks)]
    deltas = deltas_of(g, theta0, tasks)
    params = RegMeanParams(nondiagonal_scale=scale)
    by_rows = regmean_merge(theta0, deltas, params, pieces, [{"x": LayerInput(rows=x)} for x in xs])
    by_gram = regmean_merge(theta0, deltas, params, pieces, [{"x": LayerInput(gram=x.T @ x)} for x in xs])
    torch.testing.assert_close(by_rows["w"], by_gram["w"], rtol=1e-9, atol=1e-9)
    same = regmean_merge(theta0, [deltas[0]] * tasks, params, pieces, [{"x": LayerInput(rows=x)} for x in xs])
    for key in ("w", "b"):
        torch.testing.assert_close(same[key], theta0[key] + deltas[0][key], rtol=1e-9, atol=1e-9)


def test_regmean_averages_other_params_and_keeps_dtypes():
    g = torch.Generator().manual_seed(0)
    theta0, pieces = linear_model(g, 3, 4, dtype=torch.float32)
    theta0["emb"] = torch.randn(5, 4, generator=g)  # a 2-D weight without a piece: averaged too
    deltas = deltas_of(g, theta0, 3)
    inputs = [{"x": LayerInput(rows=randn(g, 6, 4))} for _ in range(3)]
    out = regmean_merge(theta0, deltas, RegMeanParams(), pieces, inputs)
    for key in ("b", "emb"):
        expected = (theta0[key].double() + sum(d[key] for d in deltas) / 3).float()
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], expected, rtol=1e-6, atol=1e-6)
    assert out["w"].dtype == torch.float32 and torch.equal(out["n"], theta0["n"])
    mean_w = theta0["w"].double() + sum(d["w"] for d in deltas) / 3
    assert not torch.allclose(out["w"].double(), mean_w, atol=1e-3)  # the linear weight is not averaged


def test_regmean_solves_each_row_block_with_its_own_input():
    g = torch.Generator().manual_seed(1)
    theta0 = {"qkv": randn(g, 4, 3)}
    pieces = [Piece("qkv[a]", "qkv", "linear", "x", 0, 2), Piece("qkv[b]", "qkv", "linear", "y", 2, 4)]
    deltas = deltas_of(g, theta0, 2)
    inputs = [{"x": LayerInput(rows=randn(g, 5, 3)), "y": LayerInput(rows=randn(g, 5, 3))} for _ in range(2)]
    out = regmean_merge(theta0, deltas, RegMeanParams(nondiagonal_scale=1.0), pieces, inputs)
    for piece in pieces:
        xs = [inp[piece.input].rows for inp in inputs]
        targets = torch.cat([x @ piece.of(theta0["qkv"] + d["qkv"]).T for x, d in zip(xs, deltas)])
        expected = torch.linalg.lstsq(torch.cat(xs), targets).solution.T
        torch.testing.assert_close(piece.of(out["qkv"]), expected, rtol=1e-9, atol=1e-9)


def test_regmean_conv_kernel_is_a_linear_map_on_patches():
    g = torch.Generator().manual_seed(2)
    theta0 = {"conv": randn(g, 4, 2, 2, 2)}  # d_in = 2 * 2 * 2 = 8
    pieces = [Piece("conv", "conv", "linear", "patches", 0, 4)]
    deltas = deltas_of(g, theta0, 2)
    xs = [randn(g, 10, 8) for _ in range(2)]
    out = regmean_merge(
        theta0, deltas, RegMeanParams(nondiagonal_scale=1.0), pieces, [{"patches": LayerInput(rows=x)} for x in xs]
    )
    assert out["conv"].shape == (4, 2, 2, 2)
    targets = torch.cat([x @ (theta0["conv"] + d["conv"]).reshape(4, 8).T for x, d in zip(xs, deltas)])
    expected = torch.linalg.lstsq(torch.cat(xs), targets).solution.T.reshape(4, 2, 2, 2)
    torch.testing.assert_close(out["conv"], expected, rtol=1e-9, atol=1e-9)


def test_regmean_directions_no_input_reaches_keep_theta0():
    g = torch.Generator().manual_seed(3)
    theta0, pieces = linear_model(g, 3, 6)
    deltas = deltas_of(g, theta0, 2)
    xs = [randn(g, 2, 6) for _ in range(2)]  # 4 rows in total: sum G has rank 4 < 6
    out = regmean_merge(
        theta0, deltas, RegMeanParams(nondiagonal_scale=1.0), pieces, [{"x": LayerInput(rows=x)} for x in xs]
    )
    assert torch.isfinite(out["w"]).all()
    null = torch.linalg.svd(torch.cat(xs)).Vh[4:].T  # (6, 2): directions orthogonal to every row
    torch.testing.assert_close((out["w"] - theta0["w"]) @ null, torch.zeros(3, 2, dtype=F64), rtol=0, atol=1e-9)
    # and the outputs on the reached directions are still the least-squares fit
    targets = torch.cat([x @ (theta0["w"] + d["w"]).T for x, d in zip(xs, deltas)])
    residual = torch.cat(xs) @ out["w"].T - targets
    best = torch.cat(xs) @ (torch.linalg.pinv(torch.cat(xs)) @ targets) - targets
    torch.testing.assert_close(residual.norm(), best.norm(), rtol=1e-9, atol=1e-9)


def test_regmean_errors_name_the_piece_and_input():
    g = torch.Generator().manual_seed(4)
    theta0, pieces = linear_model(g, 2, 3)
    deltas = deltas_of(g, theta0, 2)
    good = {"x": LayerInput(rows=randn(g, 4, 3))}
    names = ["features/a.safetensors", "features/b.safetensors"]
    with pytest.raises(ArtifactError, match=r"features/b.safetensors: no RegMean input 'x' \(needed by w\)"):
        regmean_merge(theta0, deltas, RegMeanParams(), pieces, [good, {"other": good["x"]}], names)
    with pytest.raises(ArtifactError, match=r"^task 1: RegMean input 'x' of w has Gram \(5, 5\).*d_in = 3"):
        regmean_merge(theta0, deltas, RegMeanParams(), pieces, [good, {"x": LayerInput(gram=torch.eye(5, dtype=F64))}])
    with pytest.raises(ValueError, match="1 input sets for 2 task vectors"):
        regmean_merge(theta0, deltas, RegMeanParams(), pieces, [good])


# ---- PCB -------------------------------------------------------------------------------------


def softmax(values: list[float]) -> list[float]:
    return [x / sum(values) for x in values]


def test_pcb_hand_example():
    t1, t2 = [1.0, 2.0, 0.0], [2.0, -1.0, 1.0]  # N = 2 tasks, d = 3 entries
    # intra: Norm(t1*t1) = Norm([1, 4, 0]) = [0.25, 1, 0];  Norm(t2*t2) = Norm([4, 1, 1]) = [1, 0, 0]
    intra1 = softmax([exp(2 * 0.25), exp(2 * 1.0), exp(0.0)])  # [0.16425, 0.73612, 0.09962]
    intra2 = softmax([exp(2 * 1.0), exp(0.0), exp(0.0)])  # [0.78699, 0.10651, 0.10651]
    # inter: Norm(t1*t2) = Norm([2, -2, 0]) = [1, 0, 0.5] for both i = 1 and i = 2
    cross = softmax([exp(1.0), exp(0.0), exp(0.5)])  # [0.50648, 0.18632, 0.30720]
    inter1 = [a + b for a, b in zip(softmax([exp(0.25), exp(1.0), exp(0.0)]), cross)]  # [0.76317, 0.72973, 0.50710]
    inter2 = [a + b for a, b in zip(softmax([exp(1.0), exp(0.0), exp(0.0)]), cross)]  # [1.08260, 0.39827, 0.51914]
    beta1 = [a * b for a, b in zip(intra1, inter1)]  # [0.12535, 0.53717, 0.05052] -> entry 2 dropped
    beta2 = [a * b for a, b in zip(intra2, inter2)]  # [0.85199, 0.04242, 0.05529] -> entry 1 dropped
    assert beta1 == pytest.approx([0.12535143, 0.53717181, 0.05051951], abs=1e-8)
    assert beta2 == pytest.approx([0.85198895, 0.04241803, 0.05529176], abs=1e-8)
    taus = torch.tensor([t1, t2], dtype=F64)
    torch.testing.assert_close(pcb.balance(taus), torch.tensor([beta1, beta2], dtype=F64), rtol=1e-12, atol=0)
    # drop_ratio 0.4 of 3 entries: floor(1.2) = 1 dropped per task; then each task's kept scores are
    # divided by their maximum: task 1 by beta1[1] = 0.53717, task 2 by beta2[0] = 0.85199
    w1, w2 = beta1[0] / beta1[1], beta2[0] / beta2[0]  # 0.23335, 1
    kept0 = (w1 * 1.0 + w2 * 2.0) / (w1 + w2)  # = 1.81080
    merged = torch.tensor([kept0, 2.0, 1.0], dtype=F64)  # entries 1 and 2: one task left each
    theta0 = {"w": torch.tensor([0.5, 0.0, -1.0], dtype=F64)}
    out = pcb_merge(theta0, [{"w": taus[0]}, {"w": taus[1]}], PcbParams(drop_ratio=0.4, alpha=0.5))
    torch.testing.assert_close(out["w"], theta0["w"] + 0.5 * merged, rtol=1e-12, atol=1e-12)
    assert kept0 == pytest.approx(1.8107969, abs=1e-7)


def test_pcb_drop_ties_keep_the_lower_index():
    taus = torch.ones(2, 4, dtype=F64)  # every beta equal
    out = pcb_merge({"w": torch.zeros(4)}, [{"w": taus[0]}, {"w": taus[1]}], PcbParams(drop_ratio=0.5, alpha=1.0))
    assert torch.equal(out["w"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert int(pcb.drop(torch.ones(1, 100, dtype=F64), 0.29).count_nonzero()) == 71  # 29 dropped, not floor(28.99..)


pcb_inputs = st.tuples(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 12))


@SETTINGS
@given(case=pcb_inputs)
def test_pcb_without_drop_keeps_every_entry(case):
    seed, tasks, d = case
    g = torch.Generator().manual_seed(seed)
    taus = randn(g, tasks, d)
    beta = pcb.balance(taus)
    assert (beta > 0).all() and torch.equal(pcb.drop(beta, 0.0), beta)
    out = pcb_merge({"w": torch.zeros(d, dtype=F64)}, [{"w": t} for t in taus], PcbParams(drop_ratio=0.0, alpha=1.0))
    weights = beta / beta.max(dim=1, keepdim=True).values  # each task's scores over its maximum
    torch.testing.assert_close(out["w"], (weights * taus).sum(0) / weights.sum(0), rtol=1e-12, atol=1e-12)
    # every task weighs in: a convex combination with positive weights
    low, high = taus.min(0).values, taus.max(0).values
    assert ((out["w"] >= low - 1e-12) & (out["w"] <= high + 1e-12)).all()


@SETTINGS
@given(case=pcb_inputs, ratio=st.floats(0.0, 0.95), alpha=st.floats(0.1, 3.0))
def test_pcb_identical_task_vectors_give_that_vector(case, ratio, alpha):
    seed, tasks, d = case
    g = torch.Generator().manual_seed(seed)
    tau, theta0 = randn(g, d), randn(g, d)
    out = pcb_merge({"w": theta0}, [{"w": tau}] * tasks, PcbParams(drop_ratio=ratio, alpha=alpha))
    moved = out["w"] - theta0
    kept = moved != 0
    assert int(kept.sum()) == d - int(ratio * d + 1e-9)  # floor(r d) entries dropped
    torch.testing.assert_close(moved[kept], alpha * tau[kept], rtol=1e-12, atol=1e-12)
    full = pcb_merge({"w": theta0}, [{"w": tau}] * tasks, PcbParams(drop_ratio=0.0, alpha=alpha))
    torch.testing.assert_close(full["w"], theta0 + alpha * tau, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(case=pcb_inputs, ratio=st.floats(0.0, 0.95))
def test_pcb_is_deterministic_and_ignores_task_order(case, ratio):
    seed, tasks, d = case
    g = torch.Generator().manual_seed(seed)
    theta0 = {"w": randn(g, 2, d).float(), "steps": torch.tensor(1)}
    deltas = [{"w": randn(g, 2, d)} for _ in range(tasks)]
    params = PcbParams(drop_ratio=ratio, alpha=0.7)
    first, second = pcb_merge(theta0, deltas, params), pcb_merge(theta0, deltas, params)
    assert first["w"].dtype == torch.float32 and torch.equal(first["w"], second["w"])
    assert torch.equal(first["steps"], theta0["steps"])
    torch.testing.assert_close(pcb_merge(theta0, deltas[::-1], params)["w"], first["w"], rtol=1e-6, atol=1e-6)
