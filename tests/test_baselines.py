"""TIES, RegMean and PCB merging (catmerge/merging/{ties,regmean,pcb}.py): hand-computed examples
and properties that hold for all inputs. TSV-M and Iso-C/CTS are in test_spectral_methods.py; the
comparison with FusionBench's code is test_oracle_fusionbench.py."""

from __future__ import annotations

from math import exp, tanh

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
from catmerge.merging.regmean import solve as regmean_solve
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


@SETTINGS
@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 4), d_out=st.integers(1, 6), d_in=st.integers(1, 12), rows=st.integers(1, 12))
def test_regmean_solve_is_gelsds_minimum_norm_solution_singular_or_not(seed, tasks, d_out, d_in, rows):
    """The eigendecomposition's pseudo-inverse gives LAPACK gelsd's solution, also where sum G is
    singular (fewer rows than d_in) and the null space must keep theta_0."""
    g = torch.Generator().manual_seed(seed)
    xs = [randn(g, rows, d_in) for _ in range(tasks)]
    grams = [x.T @ x for x in xs]
    deltas = [randn(g, d_out, d_in) for _ in range(tasks)]
    total = sum(grams)
    expected = torch.linalg.lstsq(total, sum(gm @ d.T for gm, d in zip(grams, deltas)), driver="gelsd").solution.T
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(regmean_solve(deltas, grams), expected, rtol=0, atol=1e-8 * scale)


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
# The authors' released code, over the whole model (catmerge/merging/pcb.py).


def released_reference(deltas: list[dict], params: PcbParams) -> dict:
    """The released method written plainly: the whole model flattened into one row per task, sorted."""
    keys = list(deltas[0])
    taus = torch.stack([torch.cat([d[k].double().reshape(-1) for k in keys]) for d in deltas])
    n, total = taus.shape
    ordered = taus.abs().sort(dim=1).values
    lo_rank, hi_rank = pcb.clip_bounds(total, params.clip_ratio)
    lo, hi = ordered[:, lo_rank : lo_rank + 1], ordered[:, hi_rank : hi_rank + 1]
    magnitude = torch.clamp(taus.abs(), lo, hi)
    low_m, high_m = magnitude.min(dim=1, keepdim=True).values, magnitude.max(dim=1, keepdim=True).values
    nu = torch.nan_to_num((magnitude - low_m) / (high_m - low_m), nan=0.0)  # the release's 0/0: 0 here
    signed = taus.sign() * nu
    if params.inter == "sum":
        inter = torch.tanh(taus * taus.sum(0))
    elif params.inter == "normalized_sum":
        inter = torch.tanh(taus * signed.sum(0))
    else:
        inter = torch.stack([torch.tanh(signed[i] * signed).sum(0) for i in range(n)])
    scores = torch.exp(n * nu**2) * inter
    ranked = scores.sort(dim=1).values
    low, top = ranked[:, min(total - 1, pcb.floor_index(total * params.drop_ratio))].unsqueeze(1), ranked[:, -1:]
    clamped = torch.clamp(scores, low, top)
    low, top = clamped.min(dim=1, keepdim=True).values, clamped.max(dim=1, keepdim=True).values
    weights = torch.nan_to_num((clamped - low) / (top - low), nan=0.0)
    merged = (weights * taus.sign() * magnitude).sum(0) / weights.sum(0).clamp(min=1e-12)
    out, start = {}, 0
    for k in keys:
        out[k] = merged[start : start + deltas[0][k].numel()].reshape(deltas[0][k].shape)
        start += deltas[0][k].numel()
    return out


def test_pcb_defaults_are_the_releases():
    assert PcbParams().model_dump() == {"drop_ratio": 0.95, "clip_ratio": 0.0001, "inter": "sum", "alpha": 1.2}
    assert pcb.clip_bounds(4, 0.25) == (1, 2)  # clamp(|x|, 2nd smallest, 3rd smallest) of 4
    assert pcb.clip_bounds(10_000, 0.0001) == (1, 9998) and pcb.clip_bounds(1, 0.0001) == (0, 0)
    assert pcb.clip_bounds(5, 0.0) == (0, 4)  # no clipping: the minimum and the maximum


def test_pcb_hand_example():
    # N = 2 tasks, the model is two tensors of 2 entries (D = 4), clip_ratio 0 (no clipping)
    t1, t2 = [0.5, -1.0, 0.0, 2.0], [1.0, 1.0, -1.0, 0.5]
    # nu = min-max of |tau| over the model: |t1| in [0, 2] -> [0.25, 0.5, 0, 1]; |t2| in [0.5, 1] -> [1, 1, 1, 0]
    # intra = exp(2 nu^2); inter = tanh(tau_i * (t1 + t2)), t1 + t2 = [1.5, 0, -1, 2.5]
    s1 = [exp(2 * 0.0625) * tanh(0.75), 0.0, 0.0, exp(2.0) * tanh(5.0)]  # [0.71972, 0, 0, 7.38839]
    s2 = [exp(2.0) * tanh(1.5), 0.0, exp(2.0) * tanh(1.0), tanh(1.25)]  # [6.68819, 0, 5.62746, 0.84828]
    # drop_ratio 0.25: the threshold is each task's floor(0.25 * 4) = 1st smallest score (0-based)
    k1, k2 = 0.0, s2[3]
    w1 = [(s - k1) / (s1[3] - k1) for s in s1]  # [0.09741, 0, 0, 1]
    w2 = [max(s - k2, 0.0) / (s2[0] - k2) for s in s2]  # [1, 0, 0.81837, 0]
    assert w1 == pytest.approx([0.0974121, 0.0, 0.0, 1.0], abs=1e-7)
    assert w2 == pytest.approx([1.0, 0.0, 0.8183654, 0.0], abs=1e-7)
    merged = [(w1[0] * 0.5 + w2[0] * 1.0) / (w1[0] + w2[0]), 0.0, -1.0, 2.0]  # entry 1: no weight, 0
    deltas = [{"w": torch.tensor(t[:2], dtype=F64), "b": torch.tensor(t[2:], dtype=F64)} for t in (t1, t2)]
    theta0 = {"w": torch.tensor([0.5, 0.0], dtype=F64), "b": torch.tensor([-1.0, 3.0], dtype=F64)}
    params = PcbParams(drop_ratio=0.25, clip_ratio=0.0, alpha=0.5)
    out = pcb_merge(theta0, deltas, params)
    torch.testing.assert_close(out["w"], theta0["w"] + 0.5 * torch.tensor(merged[:2], dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["b"], theta0["b"] + 0.5 * torch.tensor(merged[2:], dtype=F64), rtol=1e-12, atol=1e-12)
    assert merged[0] == pytest.approx(0.9556174, abs=1e-7)


def test_pcb_clips_outliers_and_keeps_zeros():
    # clip_ratio 0.25 of 4 entries: |tau| clamped to its 2nd and 3rd smallest values, 0.5 and 1
    tau = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64)
    (lo, hi), = pcb.order_statistics(lambda key: tau.abs().reshape(1, -1), ["w"], [list(pcb.clip_bounds(4, 0.25))], 4)
    assert (lo, hi) == (0.5, 1.0)
    scores, clipped = pcb.scores_of(tau.reshape(1, -1), torch.tensor([[lo]]), torch.tensor([[hi]]), "sum")
    assert clipped.tolist() == [[0.5, -1.0, 0.0, 1.0]]  # the outlier 2 becomes 1; a zero stays zero
    # one task: nu = [0, 1, 0, 1], intra = exp(nu^2), inter = tanh(tau * tau) of the unclipped tau
    expected = [tanh(0.25), exp(1.0) * tanh(1.0), 0.0, exp(1.0) * tanh(4.0)]
    torch.testing.assert_close(scores, torch.tensor([expected], dtype=F64), rtol=1e-12, atol=0)
    # one task, drop_ratio 0.25: weights above the floor(0.25 * 4) = 1st smallest score (0-based),
    # s[0] = tanh(0.25): entries 1 and 3 have weight, entry 0 (at the threshold) and 2 (below) none
    out = pcb_merge({"w": torch.zeros(4, dtype=F64)}, [{"w": tau}], PcbParams(drop_ratio=0.25, clip_ratio=0.25, alpha=1.0))
    assert out["w"].tolist() == [0.0, -1.0, 0.0, 1.0]  # a weighted mean of one value is that value
    out = pcb_merge({"w": torch.zeros(4, dtype=F64)}, [{"w": tau}], PcbParams(drop_ratio=0.5, clip_ratio=0.25, alpha=1.0))
    assert out["w"].tolist() == [0.0, 0.0, 0.0, 1.0]  # threshold s[1]: only the top entry keeps weight


def test_pcb_statistics_are_the_whole_models():
    # Scaling one tensor of every task vector moves the other tensor's merge: the clip bounds, the
    # normalisation and the drop threshold are taken over the whole model, not per tensor.
    g = torch.Generator().manual_seed(3)
    deltas = [{"a": randn(g, 6, 5), "b": randn(g, 7)} for _ in range(3)]
    louder = [{"a": d["a"], "b": 50 * d["b"]} for d in deltas]
    params = PcbParams(drop_ratio=0.5, clip_ratio=0.05)
    zeros = {"a": torch.zeros(6, 5, dtype=F64), "b": torch.zeros(7, dtype=F64)}
    assert not torch.allclose(pcb_merge(zeros, deltas, params)["a"], pcb_merge(zeros, louder, params)["a"])
    per_tensor = {k: released_reference([{k: d[k]} for d in deltas], params)[k] for k in ("a", "b")}
    assert not torch.allclose(pcb_merge(zeros, deltas, params)["a"], 1.2 * per_tensor["a"])


pcb_model = st.tuples(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9))
pcb_inputs = st.tuples(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 12))


@SETTINGS
@given(case=pcb_model, drop=st.floats(0.0, 0.99), clip=st.floats(0.0, 0.49), inter=st.sampled_from(["sum", "normalized_sum", "pairwise"]), few=st.booleans(), chunk=st.sampled_from([1, 5, 1 << 20]))
def test_pcb_equals_the_flattened_model(case, drop, clip, inter, few, chunk):
    seed, tasks, rows, cols = case
    g = torch.Generator().manual_seed(seed)
    # rounded values: repeated magnitudes and scores, zeros, and entries of both signs
    deltas = [{"w": torch.round(randn(g, rows, cols) * 4) / 8, "b": torch.round(randn(g, cols) * 4) / 8} for _ in range(tasks)]
    params = PcbParams(drop_ratio=drop, clip_ratio=clip, inter=inter, alpha=1.0)
    expected = released_reference(deltas, params)
    limit, whole = pcb.GATHER_LIMIT, pcb.CHUNK
    try:
        if few:  # no bucket is small enough to sort: the radix select runs to the last bit
            pcb.GATHER_LIMIT = 0
        pcb.CHUNK = chunk  # tensors scored in slices of this many entries
        got = pcb.merged_vector(deltas, params)
    finally:
        pcb.GATHER_LIMIT, pcb.CHUNK = limit, whole
    for key in ("w", "b"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), rows=st.integers(1, 3))
def test_pcb_order_statistics_are_exact(seed, sizes, rows):
    g = torch.Generator().manual_seed(seed)
    # few distinct values, both signs, signed zeros, and magnitudes far apart
    parts = {f"t{i}": torch.round(randn(g, rows, n) * 3) * torch.tensor(10.0, dtype=F64) ** torch.randint(-300, 300, (rows, n), generator=g) for i, n in enumerate(sizes)}
    parts["t0"][0, 0] = -0.0
    flat = torch.cat(list(parts.values()), dim=1).sort(dim=1).values
    total = flat.shape[1]
    ranks = [sorted({0, total - 1, *torch.randint(0, total, (3,), generator=g).tolist()}) for _ in range(rows)]
    for limit in (pcb.GATHER_LIMIT, 3, 0):
        old, pcb.GATHER_LIMIT = pcb.GATHER_LIMIT, limit
        try:
            got = pcb.order_statistics(lambda key: parts[key], list(parts), ranks, total)
        finally:
            pcb.GATHER_LIMIT = old
        assert got == [[flat[row, rank].item() for rank in wanted] for row, wanted in enumerate(ranks)]


@SETTINGS
@given(case=pcb_inputs, drop=st.floats(0.0, 0.95), alpha=st.floats(0.1, 3.0))
def test_pcb_identical_task_vectors_give_the_clipped_vector(case, drop, alpha):
    seed, tasks, d = case
    g = torch.Generator().manual_seed(seed)
    tau, theta0 = randn(g, d), randn(g, d)
    params = PcbParams(drop_ratio=drop, clip_ratio=0.0, alpha=alpha)
    moved = pcb_merge({"w": theta0}, [{"w": tau}] * tasks, params)["w"] - theta0
    # every task has the same weights, so each entry is its own value where kept, 0 where dropped;
    # kept: the scores above the floor(drop d)-th smallest (none if that is the maximum)
    lo, hi = tau.abs().min().reshape(1, 1), tau.abs().max().reshape(1, 1)
    scores = pcb.scores_of(tau.expand(tasks, -1), lo, hi, "sum")[0][0]
    ranked = scores.sort().values
    kept = scores > ranked[min(d - 1, pcb.floor_index(d * drop))]
    torch.testing.assert_close(moved[kept], alpha * tau[kept], rtol=1e-12, atol=1e-12)
    assert torch.equal(moved[~kept], torch.zeros_like(moved[~kept]))
    if drop == 0 and d > 1 and hi > lo:  # nothing dropped: all but the lowest score (the smallest |tau|) move
        assert int(kept.sum()) == d - int((tau.abs() == lo).sum())


@SETTINGS
@given(case=pcb_inputs, drop=st.floats(0.0, 0.95), inter=st.sampled_from(["sum", "normalized_sum", "pairwise"]))
def test_pcb_ignores_task_order_and_is_linear_in_alpha(case, drop, inter):
    seed, tasks, d = case
    g = torch.Generator().manual_seed(seed)
    theta0 = {"w": randn(g, 2, d).float(), "steps": torch.tensor(1)}
    deltas = [{"w": randn(g, 2, d)} for _ in range(tasks)]
    params = PcbParams(drop_ratio=drop, inter=inter, alpha=0.7)
    first, second = pcb_merge(theta0, deltas, params), pcb_merge(theta0, deltas, params)
    assert first["w"].dtype == torch.float32 and torch.equal(first["w"], second["w"])
    assert torch.equal(first["steps"], theta0["steps"])
    torch.testing.assert_close(pcb_merge(theta0, deltas[::-1], params)["w"], first["w"], rtol=1e-6, atol=1e-6)
    tau_m = pcb.merged_vector(deltas, params)["w"]
    torch.testing.assert_close(pcb.merged_vector(deltas[::-1], params)["w"], tau_m, rtol=1e-12, atol=1e-12)
    double = pcb_merge({"w": theta0["w"].double()}, deltas, params.model_copy(update={"alpha": 1.4}))["w"]
    torch.testing.assert_close(double, theta0["w"].double() + 1.4 * tau_m, rtol=1e-12, atol=1e-12)


def test_pcb_degenerate_inputs_give_zero_not_nan():
    zeros = {"w": torch.zeros(3, 2, dtype=F64)}
    assert torch.equal(pcb_merge(zeros, [zeros, zeros], PcbParams())["w"], zeros["w"])  # all scores equal
    const = {"w": torch.full((3, 2), 0.5, dtype=F64)}  # hi == lo: nu = 0; every score equal: no weight
    assert torch.equal(pcb_merge(zeros, [const, const], PcbParams(drop_ratio=0.5))["w"], zeros["w"])


def test_pcb_streams_from_files_as_in_memory(tmp_path, monkeypatch):
    from catmerge.io import LazyWeights, WeightsFile, save_weights

    g = torch.Generator().manual_seed(5)
    theta0 = {"a": randn(g, 8, 3).float(), "b": randn(g, 5).float()}
    deltas = [{"a": randn(g, 8, 3), "b": randn(g, 5)} for _ in range(3)]
    for i, delta in enumerate(deltas):
        save_weights(delta, tmp_path / f"t{i}.safetensors")
    files = [WeightsFile(tmp_path / f"t{i}.safetensors") for i in range(3)]
    params = PcbParams(drop_ratio=0.6, clip_ratio=0.1, alpha=1.1)
    lazy = pcb.merged_vector(files, params)
    assert isinstance(lazy, LazyWeights)
    eager = pcb.merged_vector(deltas, params)
    for key in ("a", "b"):
        assert torch.equal(lazy[key], eager[key])
    streamed, direct = pcb_merge(theta0, files, params), pcb_merge(theta0, deltas, params)
    assert all(torch.equal(streamed[k], direct[k]) for k in ("a", "b"))
    monkeypatch.setattr(pcb, "GATHER_LIMIT", 0)  # as a model too large to sort whole: the radix select, to the last bit
    radix = pcb.merged_vector(files, params)
    assert all(torch.equal(radix[k], eager[k]) for k in ("a", "b"))
