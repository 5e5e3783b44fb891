"""CAT Merging's math (catmerge/cat.py): the properties listed in cat-merging.md, on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from catmerge import cat
from catmerge.adapters import open_clip_vit
from catmerge.merging import MergeInputs, merge_method
from catmerge.merging.cat import CatParams
from catmerge.merging.task_arithmetic import TaskArithmeticParams
from catmerge.task_vectors import sum_task_vectors

SETTINGS = settings(max_examples=25, deadline=None)


def random_layer(seed: int, tasks: int, d_out: int, d_in: int, rows: int):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(tasks)]
    inputs = [cat.LayerInput(rows=torch.randn(rows, d_in, generator=g, dtype=torch.float64)) for _ in range(tasks)]
    return deltas, inputs


def as_gram(inputs):
    return [cat.LayerInput(gram=x.gram_matrix()) for x in inputs]


def projector(basis):
    return basis @ basis.T


layers = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(2, 4),  # tasks
    st.integers(4, 24),  # d_out
    st.integers(3, 12),  # d_in
    st.integers(1, 6),  # feature rows per task
)


@SETTINGS
@given(layer=layers, c=st.integers(1, 3), lam=st.floats(0.0, 3.0))
def test_basis_is_orthonormal_and_captures_the_top_eigenvalues(layer, c, lam):
    deltas, inputs = random_layer(*layer)
    for k in range(len(deltas)):
        g = cat.conflict_matrix(k, deltas, inputs, lam)
        removal = cat.removal_basis(k, deltas, inputs, lam, c)
        b = removal.basis
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1], dtype=b.dtype), atol=1e-9, rtol=0)
        # Tr(B^T G B) is the sum of the kept eigenvalues, which are G's largest (and positive)
        assert torch.trace(b.T @ g @ b).item() == pytest.approx(removal.objective, rel=1e-8, abs=1e-8)
        eigenvalues = torch.linalg.eigvalsh(g).flip(0)
        # clearly positive ones only (the code's cut is 1e-12 of the largest; stay clear of it)
        top = [v for v in eigenvalues[:c].tolist() if v > 1e-6 * eigenvalues.abs().max().item()]
        assert removal.kept[: len(top)] == pytest.approx(top, rel=1e-7, abs=1e-7)
        assert all(abs(v) <= 1e-6 * eigenvalues.abs().max().item() for v in removal.kept[len(top) :])
        assert removal.trace == pytest.approx(torch.trace(g).item(), rel=1e-9, abs=1e-9)


@SETTINGS
@given(layer=layers, c=st.integers(1, 3), lam=st.floats(0.0, 3.0))
def test_low_rank_route_and_gram_route_agree(layer, c, lam):
    deltas, inputs = random_layer(*layer)
    for k in range(len(deltas)):
        low_rank = cat.removal_basis(k, deltas, inputs, lam, c)  # rows: factored route when m < d_out
        dense = cat.removal_basis(k, deltas, as_gram(inputs), lam, c)  # Gram form
        spectrum = torch.linalg.eigvalsh(cat.conflict_matrix(k, deltas, inputs, lam)).flip(0)
        size = spectrum.abs().max().item()
        clear = [v for v in dense.kept if v > 1e-6 * size]  # away from the zero cut
        assert low_rank.kept[: len(clear)] == pytest.approx(clear, rel=1e-7, abs=1e-8)
        n = len(clear)
        # the kept subspace is unique when a gap separates it from the next eigenvalue
        if n == len(dense.kept) == len(low_rank.kept) and 0 < n < len(spectrum) and spectrum[n - 1] - spectrum[n] > 1e-6 * size:
            torch.testing.assert_close(projector(low_rank.basis), projector(dense.basis), atol=1e-6, rtol=0)


@pytest.mark.parametrize("d_out, d_in, rows, c", [(40, 30, 50, 3), (60, 6, 50, 8)])
def test_iterative_solver_matches_full_eigh(monkeypatch, d_out, d_in, rows, c):
    """Also when G_k has fewer than c positive eigenvalues (rank <= 2 d_in here): a zero cluster."""
    deltas, inputs = random_layer(3, 3, d_out, d_in, rows)
    grams = as_gram(inputs)
    full = cat.removal_basis(0, deltas, grams, 0.5, c)
    monkeypatch.setattr(cat, "DENSE_EIGH_MAX", 8)
    lanczos = cat.removal_basis(0, deltas, grams, 0.5, c)
    assert lanczos.kept == pytest.approx(full.kept, rel=1e-8)
    torch.testing.assert_close(projector(lanczos.basis), projector(full.basis), atol=1e-8, rtol=0)


@SETTINGS
@given(layer=layers, lam=st.floats(0.1, 3.0))
def test_two_tasks_without_rescale_leave_nothing_along_the_basis(layer, lam):
    seed, _, d_out, d_in, rows = layer
    deltas, inputs = random_layer(seed, 2, d_out, d_in, rows)
    removals = [cat.removal_basis(k, deltas, inputs, lam, 2) for k in range(2)]
    for i in range(2):
        k = 1 - i
        trimmed = cat.trim(i, deltas[i], removals, rescale=False)
        basis = removals[k].basis
        assert (basis.T @ trimmed).norm().item() < 1e-9 * max(1.0, deltas[i].norm().item())
        # Eq. 10's conflict term ||X_k T_i^T||_F^2 drops by exactly the part along B_k
        x_k = inputs[k].rows
        before = (x_k @ deltas[i].T).square().sum().item()
        after = (x_k @ trimmed.T).square().sum().item()
        removed = (x_k @ deltas[i].T @ basis).square().sum().item()
        assert after <= before + 1e-9 * max(1.0, before)
        assert before - after == pytest.approx(removed, rel=1e-7, abs=1e-9 * max(1.0, before))


@SETTINGS
@given(layer=layers, c=st.integers(1, 3), lam=st.floats(0.0, 3.0))
def test_conflict_terms_are_the_two_eq_10_terms_and_what_the_trim_removes(layer, c, lam):
    deltas, inputs = random_layer(*layer)
    k = 0
    basis = cat.removal_basis(k, deltas, inputs, lam, c).basis
    terms = cat.conflict_terms(k, deltas, inputs, basis)
    from_gram = cat.conflict_terms(k, deltas, as_gram(inputs), basis)
    for i, t in terms.items():
        assert t == pytest.approx(from_gram[i], rel=1e-9, abs=1e-9)
    assert sorted(terms) == list(range(1, len(deltas)))
    # sum_i (conflict - lambda own) along B_k is the objective the basis captured, Tr(B^T G_k B)
    captured = sum(t["conflict_removed"] - lam * t["own_removed"] for t in terms.values())
    assert captured == pytest.approx(cat.removal_basis(k, deltas, inputs, lam, c).objective, rel=1e-8, abs=1e-8)
    for i, t in terms.items():
        trimmed = deltas[i] - basis @ (basis.T @ deltas[i])
        left_conflict = (inputs[k].rows @ trimmed.T).square().sum().item()
        left_own = (inputs[i].rows @ trimmed.T).square().sum().item()
        # what is left after the trim is exactly the full term minus the part along B_k
        assert left_conflict == pytest.approx(t["conflict"] - t["conflict_removed"], rel=1e-8, abs=1e-8)
        assert left_own == pytest.approx(t["own"] - t["own_removed"], rel=1e-8, abs=1e-8)
        assert 0.0 <= t["conflict_removed"] <= t["conflict"] * (1 + 1e-12) + 1e-12


@SETTINGS
@given(layer=layers, alpha=st.floats(0.05, 3.0))
def test_bases_do_not_depend_on_alpha(layer, alpha):
    deltas, inputs = random_layer(*layer)
    plain = cat.removal_basis(0, deltas, inputs, 1.0, 2)
    scaled = cat.removal_basis(0, [alpha * d for d in deltas], inputs, 1.0, 2)
    assert scaled.kept == pytest.approx([alpha**2 * v for v in plain.kept], rel=1e-7, abs=1e-9)
    gaps = [a - b for a, b in zip(plain.kept, plain.kept[1:] + [0.0])]
    if len(plain.kept) == len(scaled.kept) and all(gap > 1e-6 for gap in gaps):
        torch.testing.assert_close(projector(scaled.basis), projector(plain.basis), atol=1e-6, rtol=0)


def eq10_objective(k: int, deltas, trimmed, inputs, lam: float) -> float:
    """Eq. 10 from its definition, on trimmed vectors: the conflict task k still sees plus lambda
    times the signal the trim took from each task i, sum_{i != k} ||X_k T~_i^T||^2 + lambda ||X_i (T_i - T~_i)^T||^2."""
    return sum(
        (inputs[k].rows @ trimmed[i].T).square().sum().item() + lam * (inputs[i].rows @ (deltas[i] - trimmed[i]).T).square().sum().item()
        for i in range(len(deltas)) if i != k
    )


@SETTINGS
@given(layer=layers, c=st.integers(1, 3), lam=st.floats(0.0, 3.0), drop=st.booleans())
def test_cat_trim_minimizes_eq_10_better_than_random_and_bottom_bases(layer, c, lam, drop):
    """Among removals of c directions, B_k's trim gives the lowest Eq. 10 objective: below no trim
    (when non-positive directions are dropped), 20 random c-dimensional bases and the bottom-c eigenvectors (G_k is indefinite for
    lambda > 0). The trims are applied by `cat.trim`, the code the merge uses."""
    deltas, inputs = random_layer(*layer)
    d_out = deltas[0].shape[0]
    if c >= d_out:
        return
    k = 0
    none = cat.Removal(torch.zeros(d_out, 0, dtype=torch.float64), None, [], 0.0)

    def objective(basis) -> float:
        removals = [none] * len(deltas)
        removals[k] = cat.Removal(basis, None, [], 0.0)
        trimmed = [cat.trim(i, d, removals, rescale=False) for i, d in enumerate(deltas)]
        return eq10_objective(k, deltas, trimmed, inputs, lam)

    removal = cat.removal_basis(k, deltas, inputs, lam, c, drop_nonpositive=drop)
    best = objective(removal.basis)
    scale = 1e-9 * max(1.0, objective(none.basis))
    if drop:  # with exactly c directions forced, a non-positive one may raise it above no trim
        assert best <= objective(none.basis) + scale
    # Eq. 10 = (sum of the conflict terms) - Tr(B^T G_k B): the trim lowers it by the kept eigenvalues
    assert best == pytest.approx(objective(none.basis) - removal.objective, rel=1e-7, abs=scale)
    g = torch.Generator().manual_seed(layer[0])
    for _ in range(20):
        random_basis = torch.linalg.qr(torch.randn(d_out, c, dtype=torch.float64, generator=g))[0]
        assert best <= objective(random_basis) + scale
    bottom = torch.linalg.eigh(cat.conflict_matrix(k, deltas, inputs, lam)).eigenvectors[:, :c]
    assert best <= objective(bottom) + scale


def test_non_positive_directions_are_dropped():
    deltas, inputs = random_layer(0, 3, 10, 6, 2)
    same = [inputs[0]] * 3
    # every task reads the same rows and lambda > 1: G_k = (1 - lambda) sum T_i A T_i^T is negative
    # semi-definite, so no direction lowers the objective
    assert cat.removal_basis(0, deltas, same, 2.0, 3).basis.shape == (10, 0)
    assert cat.removal_basis(0, deltas, same, 2.0, 3, drop_nonpositive=False).basis.shape == (10, 3)
    assert cat.removal_basis(0, deltas, inputs, 2.0, 3).basis.shape == (10, 3)


def test_removals_apply_one_after_another_in_task_order():
    deltas, inputs = random_layer(2, 3, 12, 5, 3)
    removals = [cat.removal_basis(k, deltas, inputs, 1.0, 2) for k in range(3)]
    b1, b2 = removals[1].basis, removals[2].basis
    eye = torch.eye(12, dtype=torch.float64)
    expected = (eye - b2 @ b2.T) @ (eye - b1 @ b1.T) @ deltas[0]
    torch.testing.assert_close(cat.trim(0, deltas[0], removals, rescale=False), expected, rtol=0, atol=1e-12)


def test_norm_scale_coordinates_that_would_not_lower_the_objective_are_dropped():
    deltas = [torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    same = [torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))] * 3
    assert cat.norm_scale_mask(0, deltas, same, 2.0, 3).mask.tolist() == []  # (1 - lambda) < 0 everywhere
    assert len(cat.norm_scale_mask(0, deltas, same, 2.0, 3, drop_nonpositive=False).mask) == 3
    assert len(cat.norm_scale_mask(0, deltas, same, 0.5, 3).mask) == 3


def test_rescale_restores_the_norm_and_c_zero_changes_nothing():
    deltas, inputs = random_layer(1, 3, 12, 5, 3)
    removals = [cat.removal_basis(k, deltas, inputs, 1.0, 2) for k in range(3)]
    trimmed = cat.trim(0, deltas[0], removals, rescale=True)
    assert trimmed.norm().item() == pytest.approx(deltas[0].norm().item(), rel=1e-12)
    assert not torch.allclose(trimmed, deltas[0])
    nothing = [cat.removal_basis(k, deltas, inputs, 1.0, 0) for k in range(3)]
    assert cat.trim(0, deltas[0], nothing, rescale=True) is deltas[0]


@SETTINGS
@given(seed=st.integers(0, 10_000), tasks=st.integers(2, 4), d=st.integers(2, 12), rows=st.integers(1, 5), lam=st.floats(0.0, 2.0))
def test_norm_scale_scores_are_eq_13(seed, tasks, d, rows, lam):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(tasks)]
    x_hat = [torch.randn(rows, d, generator=g, dtype=torch.float64) for _ in range(tasks)]
    sums = [x.square().sum(dim=0) for x in x_hat]
    removal = cat.norm_scale_mask(0, deltas, sums, lam, d, drop_nonpositive=False)
    brute = sum(((x_hat[0] * deltas[i]) ** 2).sum(0) - lam * ((x_hat[i] * deltas[i]) ** 2).sum(0) for i in range(1, tasks))
    assert removal.mask.tolist() == torch.sort(brute, descending=True, stable=True).indices.tolist()
    assert removal.kept == pytest.approx(torch.sort(brute, descending=True).values.tolist(), rel=1e-9, abs=1e-12)


def test_masks_break_ties_to_the_lowest_index_and_use_the_chosen_score():
    deltas = [torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)]
    deltas[2][4] = 5.0
    assert cat.shift_mask(0, deltas, 2).mask.tolist() == [4, 0]  # others: T_1^2 + T_2^2
    assert cat.shift_mask(0, deltas, 2, "own").mask.tolist() == [0, 1]  # own: T_0^2, all tied
    assert cat.shift_mask(1, [torch.zeros(6, dtype=torch.float64)] * 2, 3).mask.tolist() == []  # nothing moved


def micro_model(seed: int, tasks: int = 3):
    from catmerge.models import create_image_tower

    torch.manual_seed(seed)
    theta0 = {k: v.double() for k, v in create_image_tower("micro-vit-minilm").state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    tvs = [{k: 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta0.items()} for _ in range(tasks)]
    features = []
    for _ in range(tasks):
        linear = {}
        sums = {}
        for piece in open_clip_vit.pieces({k: tuple(v.shape) for k, v in theta0.items()}, "fused"):
            if piece.family == "linear":
                linear[piece.input] = cat.LayerInput(rows=torch.randn(6, theta0[piece.key].shape[1], generator=g, dtype=torch.float64))
            elif piece.family == "norm_scale":
                sums[piece.input] = torch.rand(theta0[piece.key].shape[0], generator=g, dtype=torch.float64)
        features.append((linear, sums))
    return theta0, tvs, features


@pytest.mark.parametrize("qkv", ["split", "fused"])
def test_c_zero_is_task_arithmetic_bit_for_bit(qkv):
    theta0, tvs, features = micro_model(0)
    pieces = open_clip_vit.pieces({k: tuple(v.shape) for k, v in theta0.items()}, qkv)
    removals, _ = cat.model_removals(pieces, tvs, features, cat.Settings(c=0, lam=1.0, c_norm=0, lambda_norm=1.0, c_shift=0))
    cat_sum = cat.trimmed_sum(pieces, tvs, removals, rescale=True)
    ta_sum = sum_task_vectors(tvs)
    for key in ta_sum:
        assert torch.equal(cat_sum[key], ta_sum[key]), key
    merged = merge_method("task_arithmetic")(theta0, tvs, TaskArithmeticParams(alpha=0.3))
    cat_merged = merge_method("cat")(theta0, tvs, CatParams(alpha=0.3), MergeInputs(removals=(pieces, removals)))
    assert all(torch.equal(merged[k], cat_merged[k]) for k in merged)


def test_float32_task_vectors_merge_and_c_zero_is_still_task_arithmetic():
    theta0, tvs, features = micro_model(2)
    theta0 = {k: v.float() for k, v in theta0.items()}
    tvs32 = [{k: v.float() for k, v in tv.items()} for tv in tvs]
    pieces = open_clip_vit.pieces({k: tuple(v.shape) for k, v in theta0.items()}, "split")
    for c in (0, 2):
        removals, _ = cat.model_removals(pieces, tvs32, features, cat.Settings(c=c, lam=1.0, c_norm=c, lambda_norm=1.0, c_shift=c))
        cat_merged = merge_method("cat")(theta0, tvs32, CatParams(alpha=0.3), MergeInputs(removals=(pieces, removals)))
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in cat_merged.values())
    ta = merge_method("task_arithmetic")(theta0, tvs32, TaskArithmeticParams(alpha=0.3))
    removals, _ = cat.model_removals(pieces, tvs32, features, cat.Settings(c=0, lam=1.0, c_norm=0, lambda_norm=1.0, c_shift=0))
    zero = merge_method("cat")(theta0, tvs32, CatParams(alpha=0.3), MergeInputs(removals=(pieces, removals)))
    assert all(torch.equal(ta[k], zero[k]) for k in ta)


def test_split_qkv_trims_q_k_v_separately():
    theta0, tvs, features = micro_model(1)
    shapes = {k: tuple(v.shape) for k, v in theta0.items()}
    settings_ = cat.Settings(c=2, lam=1.0, c_norm=2, lambda_norm=1.0, c_shift=2)
    split = open_clip_vit.pieces(shapes, "split")
    removals, _ = cat.model_removals(split, tvs, features, settings_)
    key = "transformer.resblocks.0.attn.in_proj_weight"
    bases = [removals[f"{key}[{p}]"][1].basis for p in "qkv"]
    assert all(b.shape == (16, 2) for b in bases)
    fused, _ = cat.model_removals(open_clip_vit.pieces(shapes, "fused"), tvs, features, settings_)
    fused_basis = fused[key][1].basis
    assert fused_basis.shape == (48, 2)
    # the fused basis is not the q, k, v bases side by side
    assert not torch.allclose(projector(fused_basis), torch.block_diag(*(projector(b) for b in bases)), atol=1e-3)
    # each block is trimmed by its own basis only: q rows of T_0 after trimming by task 1 (and 2)
    trimmed = cat.trimmed_sum(split, tvs, removals, rescale=False)
    q_rows = sum(cat.trim(i, tvs[i][key][:16], removals[f"{key}[q]"], False) for i in range(3))
    torch.testing.assert_close(trimmed[key][:16], q_rows, rtol=0, atol=1e-12)
    # everything "other" is summed untouched
    torch.testing.assert_close(trimmed["proj"], sum(tv["proj"] for tv in tvs), rtol=0, atol=0)


def test_rescale_is_per_piece_and_never_touches_shifts():
    theta0, tvs, features = micro_model(3, tasks=2)
    shapes = {k: tuple(v.shape) for k, v in theta0.items()}
    pieces = open_clip_vit.pieces(shapes, "split")
    removals, _ = cat.model_removals(pieces, tvs, features, cat.Settings(c=2, lam=0.5, c_norm=2, lambda_norm=0.5, c_shift=2))
    # two tasks: the sum is T_0 trimmed by task 1 plus T_1 trimmed by task 0; recover T_0's part by
    # merging T_0 with a zero vector for task 1 (task 1's removals come from the real T_1)
    only_first = [tvs[0], {k: torch.zeros_like(v) for k, v in tvs[1].items()}]
    trimmed = cat.trimmed_sum(pieces, only_first, removals, rescale=True)
    block = "transformer.resblocks.0."
    for rows in (slice(0, 16), slice(16, 32), slice(32, 48)):  # q, k, v: each keeps its own norm
        original = tvs[0][block + "attn.in_proj_weight"][rows]
        assert trimmed[block + "attn.in_proj_weight"][rows].norm().item() == pytest.approx(original.norm().item(), rel=1e-12)
        assert not torch.allclose(trimmed[block + "attn.in_proj_weight"][rows], original)
    ln = block + "ln_1.weight"
    assert trimmed[ln].norm().item() == pytest.approx(tvs[0][ln].norm().item(), rel=1e-12)  # norm scales rescaled
    bias = block + "mlp.c_fc.bias"
    mask = removals[bias][1].mask
    assert len(mask) == 2
    kept = torch.ones_like(tvs[0][bias], dtype=torch.bool)
    kept[mask] = False
    assert torch.equal(trimmed[bias][kept], tvs[0][bias][kept]) and (trimmed[bias][mask] == 0).all()  # not rescaled
