"""Scale: files read and written one tensor at a time, the all-tasks bases route, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from catmerge import cat
from catmerge.cat import LayerInput
from catmerge.features import layer_inputs
from catmerge.io import (
    METADATA_KEY,
    ArtifactError,
    WeightsFile,
    load_weights,
    read_metadata,
    save_weights,
    weights_writer,
)
from catmerge.merging import MergeInputs, merge, needs
from catmerge.merging import cat as cat_merge
from catmerge.params import load_params
from catmerge.selection import chosen_params
from catmerge.task_vectors import task_vector
from catmerge.workspace import Workspace
from conftest import ROOT

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


@st.composite
def state_dicts(draw):
    names = draw(st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=8), min_size=1, max_size=6, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        seed = draw(st.integers(0, 2**16))
        out[name] = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 50).to(dtype)
    return out


@settings(max_examples=40, deadline=None)
@given(tensors=state_dicts(), metadata=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_streamed_files_are_byte_identical_to_safetensors_save_file(tmp_path_factory, tensors, metadata):
    tmp = tmp_path_factory.mktemp("st")
    save_weights(tensors, tmp / "ours.safetensors", metadata)
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "theirs.safetensors"), metadata=header)
    assert (tmp / "ours.safetensors").read_bytes() == (tmp / "theirs.safetensors").read_bytes()
    lazy = WeightsFile(tmp / "ours.safetensors")
    assert set(lazy) == set(tensors) and lazy.metadata == (metadata or {})
    for name, value in tensors.items():
        assert lazy.specs[name] == (value.dtype, tuple(value.shape))
        assert torch.equal(lazy[name], value)


def test_writer_refuses_unplanned_misshapen_or_missing_tensors_and_leaves_no_file(tmp_path):
    path = tmp_path / "out.safetensors"
    specs = {"a": (torch.float32, (2, 3)), "b": (torch.float64, (4,))}
    for bad, message in (
        (lambda write: write("c", torch.zeros(1)), "c is not among the tensors planned"),
        (lambda write: write("a", torch.zeros(3, 2)), r"a is \(3, 2\) torch.float32, planned \(2, 3\)"),
        (lambda write: write("a", torch.zeros(2, 3)), r"not written: \['b'\]"),
    ):
        with pytest.raises(ArtifactError, match=message), weights_writer(path, specs) as write:
            bad(write)
        assert not path.exists() and not list(tmp_path.iterdir())
    with weights_writer(path, specs) as write:  # any order
        write("b", torch.arange(4.0, dtype=torch.float64))
        write("a", torch.ones(2, 3))
    assert torch.equal(load_weights(path)["b"], torch.arange(4.0, dtype=torch.float64))


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / "tv.safetensors"
    save_weights({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="tv.safetensors"):
        WeightsFile(path)["w"]


def test_streamed_stages_give_the_in_memory_paths_bytes_on_the_micro_benchmark(micro_project, tmp_path, monkeypatch):
    """The stages read and write one tensor at a time; the same functions on whole state dicts in
    memory give the same task vectors, bases and merged models, byte for byte."""
    monkeypatch.chdir(micro_project)
    params = load_params()
    data = micro_project / "data"
    pretrained = load_weights(data / "pretrained/image_tower.safetensors")
    vectors = []
    for task in params.tasks:
        expert = load_weights(data / f"experts/{task}/expert.safetensors")
        vector = task_vector(pretrained, expert, task, getattr(torch, params.task_vectors.dtype))
        assert isinstance(vector, dict)  # in memory
        stored = data / f"task_vectors/{task}.safetensors"
        save_weights(vector, tmp_path / "tv.safetensors", read_metadata(stored))
        assert (tmp_path / "tv.safetensors").read_bytes() == stored.read_bytes(), task
        vectors.append(vector)

    paths = [data / f"features/{t}.safetensors" for t in params.tasks]
    features = [(*layer_inputs(load_weights(p), str(p)), read_metadata(p)) for p in paths]
    pieces, removals, info, terms = cat_merge.compute_removals(pretrained, vectors, features, params.cat, [str(p) for p in paths])
    cat_merge.write_removals(tmp_path / "bases", params.tasks, pieces, removals, info, terms)
    for stored in sorted((data / "bases").iterdir()):
        assert (tmp_path / "bases" / stored.name).read_bytes() == stored.read_bytes(), stored.name

    selection = json.loads((micro_project / "metrics/selection.json").read_text())
    workspace = Workspace(params, micro_project)
    for method in params.merge.methods:
        method_params = chosen_params(params, selection, method)
        if "removals" in needs(method):
            inputs = MergeInputs(removals=cat_merge.read_removals(data / "bases", params.tasks))
        else:  # exemplars and their layer inputs through the experts, as the merge stage takes them
            inputs = workspace.merge_inputs(method, method_params)
        merged = merge(method, pretrained, vectors, method_params, inputs)
        assert isinstance(merged, dict)
        stored = data / f"merged/{method}.safetensors"
        save_weights(merged, tmp_path / "merged.safetensors", read_metadata(stored))
        assert (tmp_path / "merged.safetensors").read_bytes() == stored.read_bytes(), method


# ---- the all-tasks route of CAT's bases ------------------------------------------------------


def low_rank_problem(seed: int, tasks: int, d_out: int, d_in: int, rows: int, rank: int = 6, dtype=torch.float64):
    """Task vectors of rank `rank` with growing scales and feature rows with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.linspace(1.0, 0.1, d_in, dtype=torch.float64)
    deltas = [(torch.randn(d_out, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d_in, generator=g, dtype=torch.float64)) * (1 + i) for i in range(tasks)]
    inputs = [torch.randn(rows, d_in, generator=g, dtype=torch.float64) * decay for _ in range(tasks)]
    return [d.to(dtype) for d in deltas], inputs


def principal_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine of the principal angles between the column spaces of a and b."""
    return float(torch.linalg.svdvals(a.double().T @ b.double()).min()) if a.shape[1] else 1.0


@pytest.mark.parametrize(
    ("rows", "d_in", "rank", "lam", "drop", "expected_route"),
    [
        (20, 40, 6, 1.0, True, "row space"),  # 100 rows in all: the exact small-space route, G_k of low rank
        (80, 40, 6, 1.0, True, "lanczos"),  # 400 rows > 256: Lanczos on the factors
        (20, 40, 6, 2.0, True, "row space"),  # low rank and indefinite, the non-positive ones dropped
        (80, 320, 300, 6.0, False, "lanczos"),  # full rank and indefinite, nothing dropped
    ],
)
def test_all_tasks_route_agrees_with_dense_eigh(monkeypatch, rows, d_in, rank, lam, drop, expected_route):
    monkeypatch.setattr(cat, "ROWS_ROUTE_MIN_WIDTH", 0)
    routes = []
    original_factored, original_eigsh = cat._top_eigenpairs_factored, None
    monkeypatch.setattr(cat, "_top_eigenpairs_factored", lambda *a: routes.append("row space") or original_factored(*a))
    import scipy.sparse.linalg as sparse

    original_eigsh = sparse.eigsh
    monkeypatch.setattr(sparse, "eigsh", lambda *a, **k: routes.append("lanczos") or original_eigsh(*a, **k))

    c, d_out = 3, 300
    deltas, rows_ = low_rank_problem(rows + int(lam), 3, d_out, d_in, rows, rank)
    fast, terms = cat.removal_bases(deltas, [LayerInput(rows=x) for x in rows_], lam, c, drop)
    assert set(routes) == {expected_route}
    assert all(r.kept for r in fast)  # every task removes something: the comparison is not vacuous
    grams = [LayerInput(gram=x.T @ x) for x in rows_]  # forces the dense route: G_k formed, full eigh
    for k, removal in enumerate(fast):
        reference = cat.removal_basis(k, deltas, grams, lam, c, drop)
        values = torch.linalg.eigvalsh(cat.conflict_matrix(k, deltas, grams, lam))
        if len(reference.kept) == c:  # a well-defined top-c subspace
            assert values[-c] - values[-c - 1] > 1e-6 * values.abs().max()
        assert values[0] < 0 < values[-1] - 1e-9 * values.abs().max() or lam == 1.0  # indefinite where asked
        assert removal.basis.shape == reference.basis.shape
        assert principal_cosine(removal.basis, reference.basis) > 1 - 1e-9
        assert removal.kept == pytest.approx(reference.kept, rel=1e-8, abs=1e-12 * float(values.abs().max()))
        assert removal.trace == pytest.approx(reference.trace, rel=1e-9)
        assert torch.allclose(removal.basis.T @ removal.basis, torch.eye(removal.basis.shape[1], dtype=torch.float64), atol=1e-10)
        expected = cat.conflict_terms(k, deltas, [LayerInput(rows=x) for x in rows_], reference.basis)
        for i, pair in expected.items():
            for name, value in pair.items():
                assert terms[k][i][name] == pytest.approx(value, rel=1e-7, abs=1e-12), (k, i, name)


def test_all_tasks_route_in_float32_finds_nearly_the_same_subspace(monkeypatch):
    monkeypatch.setattr(cat, "ROWS_ROUTE_MIN_WIDTH", 0)
    deltas, rows = low_rank_problem(7, 3, 300, 40, 80)
    exact, _ = cat.removal_bases(deltas, [LayerInput(rows=x) for x in rows], 1.0, 2)
    single, _ = cat.removal_bases([d.float() for d in deltas], [LayerInput(rows=x) for x in rows], 1.0, 2)
    for a, b in zip(exact, single):
        assert b.basis.dtype == torch.float64  # stored in float64 whatever the precision
        assert principal_cosine(a.basis, b.basis) > 1 - 1e-4


def reference_bases(deltas, rows, lam, c, drop=True):
    grams = [LayerInput(gram=x.T @ x) for x in rows]  # the dense route: G_k formed, full eigh
    return [cat.removal_basis(k, [d.double() for d in deltas], grams, lam, c, drop) for k in range(len(deltas))]


def test_all_tasks_route_with_different_row_counts_per_task(monkeypatch):
    """BERT keeps only the non-padding tokens: tasks have different numbers of rows."""
    monkeypatch.setattr(cat, "ROWS_ROUTE_MIN_WIDTH", 0)
    deltas, _ = low_rank_problem(3, 3, 300, 40, 10, rank=40)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(n, 40, generator=g, dtype=torch.float64) for n in (30, 28, 26)]
    fast, _ = cat.removal_bases(deltas, [LayerInput(rows=x) for x in rows], 1.0, 3)
    for removal, reference in zip(fast, reference_bases(deltas, rows, 1.0, 3)):
        assert removal.kept == pytest.approx(reference.kept, rel=1e-8)
        assert principal_cosine(removal.basis, reference.basis) > 1 - 1e-9


def test_lanczos_failure_falls_back_to_a_dense_eigh(monkeypatch):
    import scipy.sparse.linalg as sparse

    def fail(*args, **kwargs):
        raise sparse.ArpackNoConvergence("no convergence", [], [])

    monkeypatch.setattr(cat, "ROWS_ROUTE_MIN_WIDTH", 0)
    monkeypatch.setattr(sparse, "eigsh", fail)
    deltas, rows = low_rank_problem(5, 3, 300, 320, 80, rank=300)  # 400 rows > d_out: Lanczos first
    fast, _ = cat.removal_bases(deltas, [LayerInput(rows=x) for x in rows], 1.0, 2)
    for removal, reference in zip(fast, reference_bases(deltas, rows, 1.0, 2)):
        assert principal_cosine(removal.basis, reference.basis) > 1 - 1e-9


def test_float32_precision_on_every_route_keeps_float64_bases_and_drops_round_off(monkeypatch):
    # narrow layers (the one-task-at-a-time route) run in float64 whatever the precision
    deltas, rows = low_rank_problem(2, 3, 30, 40, 20)
    narrow, _ = cat.removal_bases([d.float() for d in deltas], [LayerInput(rows=x) for x in rows], 1.0, 2)
    exact, _ = cat.removal_bases([d.float().double() for d in deltas], [LayerInput(rows=x) for x in rows], 1.0, 2)
    assert all(a.basis.dtype == torch.float64 and torch.equal(a.basis, b.basis) for a, b in zip(narrow, exact))
    # wide ones in float32: G_k of rank 2 with lambda 3 has nothing positive; round-off must not count
    monkeypatch.setattr(cat, "ROWS_ROUTE_MIN_WIDTH", 0)
    deltas, rows = low_rank_problem(4, 3, 300, 40, 20, rank=1)  # 100 rows: the row-space route
    for dtype in (torch.float64, torch.float32):
        removals, _ = cat.removal_bases([d.to(dtype) for d in deltas], [LayerInput(rows=x) for x in rows], 3.0, 5)
        kept = [len(r.kept) for r in removals]
        assert kept == [len(r.kept) for r in reference_bases(deltas, rows, 3.0, 5)], (dtype, kept)


def test_lazy_mappings_compute_each_tensor_once_per_read():
    from catmerge.io import LazyWeights
    from catmerge.task_vectors import apply_task_vector

    calls: list[str] = []
    specs = {f"w{j}": (torch.float32, (3,)) for j in range(4)}
    delta = LazyWeights(specs, lambda key: calls.append(key) or torch.ones(3))
    theta0 = LazyWeights(specs, lambda key: torch.zeros(3))
    merged = apply_task_vector(theta0, delta, 0.5)
    assert "w0" in merged and "nope" not in merged and not calls  # membership reads nothing
    assert all(torch.equal(merged[k], torch.full((3,), 0.5)) for k in merged)
    assert sorted(calls) == sorted(specs)


# ---- memory --------------------------------------------------------------------------------

MEMORY_SCRIPT = r"""
import json, re, sys
import torch
from catmerge.io import WeightsFile, load_weights, save_weights
from catmerge.task_vectors import apply_task_vector, sum_task_vectors, task_vector

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

def peak_growth(work):
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    work()
    return status("VmHWM") - before

tmp, tasks, layers, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
keys = [f"layer{j}.weight" for j in range(layers)]
for name in ["pretrained"] + [f"expert{k}" for k in range(tasks)]:
    save_weights({key: torch.randn(width, width, generator=g) for key in keys}, f"{tmp}/{name}.safetensors")
experts = [f"{tmp}/expert{k}.safetensors" for k in range(tasks)]

def streamed():
    pretrained = WeightsFile(f"{tmp}/pretrained.safetensors")
    for k, path in enumerate(experts):
        save_weights(task_vector(pretrained, WeightsFile(path), path, torch.float32), f"{tmp}/tv{k}.safetensors")
    vectors = [WeightsFile(f"{tmp}/tv{k}.safetensors") for k in range(tasks)]
    save_weights(apply_task_vector(pretrained, sum_task_vectors(vectors), 0.3), f"{tmp}/merged.safetensors")

def in_memory():
    pretrained = load_weights(f"{tmp}/pretrained.safetensors")
    vectors = [task_vector(pretrained, load_weights(path), path, torch.float32) for path in experts]
    save_weights(apply_task_vector(pretrained, sum_task_vectors(vectors), 0.3), f"{tmp}/merged_in_memory.safetensors")

print(json.dumps({"streamed": peak_growth(streamed), "in_memory": peak_growth(in_memory)}))
"""


def test_peak_memory_follows_the_layer_size_not_tasks_times_the_model(tmp_path):
    """Task vectors and a Task Arithmetic merge of K = 4 experts of 48 layers (1 MB each, 48 MB a
    model) in a subprocess: streamed, the peak grows by a few layers; in memory, by K models."""
    tasks, layers, width = 4, 48, 512
    layer, model = width * width * 4, layers * width * width * 4
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(tasks), str(layers), str(width)],
                          capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert growth["in_memory"] > tasks * model  # the measurement sees whole models when they are held
    assert growth["streamed"] < 8 * (tasks + 2) * layer + 16 * 2**20, growth  # about a layer per input, not K models
    assert (tmp_path / "merged.safetensors").read_bytes() == (tmp_path / "merged_in_memory.safetensors").read_bytes()
