"""Bad inputs give an ArtifactError naming the file (and key) and what was expected."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from catmerge import cat
from catmerge.adapters import Piece
from catmerge.data import read_split, write_split
from catmerge.evaluation import load_head
from catmerge.features import layer_inputs, load_features
from catmerge.hub_datasets import HubTask, load_split
from catmerge.io import ArtifactError, LazyWeights, WeightsFile, save_weights
from catmerge.merging import cat as cat_merge
from catmerge.merging.cat import CatParams
from catmerge.models import copy_weights, load_into
from catmerge.task_vectors import task_vector

BAD = [float("nan"), float("inf"), float("-inf")]


def named(path, rest: str) -> str:
    """A match pattern: the file's path, then `rest` (a regex)."""
    return re.escape(str(path)) + rest


# ---- task vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("which", ["pretrained", "expert"])
def test_task_vector_refuses_nonfinite_tensor_of_either_file(tmp_path, which, bad):
    good = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    broken = {"a": torch.ones(2, 2), "b": torch.tensor([0.0, bad, 0.0])}
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("pretrained", "expert")}
    save_weights(broken if which == "pretrained" else good, paths["pretrained"])
    save_weights(broken if which == "expert" else good, paths["expert"])
    delta = task_vector(WeightsFile(paths["pretrained"]), WeightsFile(paths["expert"]), str(paths["expert"]))
    assert isinstance(delta, LazyWeights)  # still one tensor at a time: nothing read yet
    assert torch.equal(delta["a"], torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ArtifactError, match=named(paths[which], r": b contains NaN or Inf$")):
        delta["b"]


def test_task_vector_names_an_in_memory_pretrained_model_pretrained():
    with pytest.raises(ArtifactError, match=r"^pretrained: w contains NaN or Inf$"):
        task_vector({"w": torch.tensor([1.0, float("nan")])}, {"w": torch.ones(2)}, "expert.safetensors")


# ---- zero-shot heads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "num_classes", "embed_dim", "problem"),
    [
        (torch.tensor([[0.0, float("nan")]] * 3), None, None, r": 'weight' contains NaN or Inf$"),
        (torch.tensor([[0.0, float("inf")]] * 3), 3, 2, r": 'weight' contains NaN or Inf$"),
        (torch.ones(7, 4), 10, None, r": 'weight' has 7 rows, the dataset has 10 classes$"),
        (torch.ones(7, 4), 7, 8, r": 'weight' has 4 columns, the image tower's embeddings have 8$"),
        (torch.ones(7), None, None, r": expected a 2-D tensor 'weight' \(num_classes x embed_dim\)$"),
        (torch.ones(7, 4, dtype=torch.int64), 7, 4, r": 'weight' is torch.int64, expected a floating-point tensor$"),
    ],
)
def test_load_head_refuses_bad_heads(tmp_path, weight, num_classes, embed_dim, problem):
    path = tmp_path / "head.safetensors"
    save_weights({"weight": weight}, path)
    with pytest.raises(ArtifactError, match=named(path, problem)):
        load_head(path, num_classes, embed_dim)


def test_load_head_accepts_a_head_that_fits(tmp_path):
    path = tmp_path / "head.safetensors"
    save_weights({"weight": torch.ones(10, 4)}, path)
    assert load_head(path, 10, 4).shape == (10, 4)


# ---- loading weights into a tower --------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("loader", [copy_weights, load_into])
def test_loading_a_file_with_nonfinite_weights_names_file_and_key(tmp_path, loader, bad):
    model = nn.Linear(3, 2)
    path = tmp_path / "expert.safetensors"
    save_weights({"weight": torch.ones(2, 3), "bias": torch.tensor([0.0, bad])}, path)
    with pytest.raises(ArtifactError, match=named(path, r": bias contains NaN or Inf$")):
        loader(model, WeightsFile(path) if loader is copy_weights else path)


def test_loading_in_memory_nonfinite_weights_names_the_key():
    weights = {"weight": torch.full((2, 3), float("nan")), "bias": torch.zeros(2)}
    with pytest.raises(ArtifactError, match=r"^weight contains NaN or Inf$"):
        copy_weights(nn.Linear(3, 2), weights)


# ---- dataset splits ----------------------------------------------------------------------------


def test_missing_split_is_named(tmp_path):
    with pytest.raises(ArtifactError, match=named(tmp_path / "train.parquet", "$")) as info:
        read_split(tmp_path / "train.parquet")
    assert str(info.value).startswith("missing dataset split: ")


def test_empty_split_is_refused(tmp_path):
    path = tmp_path / "test.parquet"
    write_split(np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64), ["a", "b"], path)
    with pytest.raises(ArtifactError, match=named(path, r": the split has no rows$")):
        read_split(path)


def test_hub_split_missing_from_the_spec_names_repo_split_and_the_known_ones(tmp_path):
    spec = HubTask(repo=str(tmp_path / "repo"), templates=["a photo of a {}."])
    expected = named(tmp_path / "repo", r" \(mytask, split val\): no split 'val' in hub.datasets.mytask.splits; splits: train, test$")
    with pytest.raises(ArtifactError, match=r"^dataset " + expected):
        load_split("mytask", spec, "val", 8)


# ---- CAT removals and features -----------------------------------------------------------------

LINEAR = Piece("w", "w", "linear", "x", 0, 4)
SHIFT = Piece("b", "b", "shift", None, 0, 4)


@pytest.mark.parametrize(
    ("basis", "mask", "problem"),
    [
        (torch.tensor([[float("nan")], [0.0], [0.0], [0.0]], dtype=torch.float64), torch.tensor([1]), r": w.basis contains NaN or Inf$"),
        (torch.tensor([[1.0], [0.0], [0.0], [0.0]], dtype=torch.float64), torch.tensor([2, -1]), r": b.mask has a negative index \(-1\)$"),
    ],
)
def test_read_removals_refuses_nonfinite_basis_and_negative_mask(tmp_path, basis, mask, problem):
    by_piece = {"w": [cat.Removal(basis, None, [], 0.0)], "b": [cat.Removal(None, mask, [], 0.0)]}
    cat_merge.write_removals(tmp_path / "bases", ["t"], [LINEAR, SHIFT], by_piece, {"adapter": "open_clip_vit"})
    with pytest.raises(ArtifactError, match=named(tmp_path / "bases" / "t.safetensors", problem)):
        cat_merge.read_removals(tmp_path / "bases", ["t"])


@pytest.mark.parametrize("from_file", [True, False], ids=["file", "in-memory"])
@pytest.mark.parametrize(("form", "stored"), [("rows", torch.ones(3, 5)), ("gram", torch.eye(5))])
def test_features_wider_than_the_weight_input_are_refused(tmp_path, form, stored, from_file):
    key = "transformer.resblocks.0.mlp.c_fc"
    pretrained = {f"{key}.weight": torch.zeros(8, 4)}
    g = torch.Generator().manual_seed(0)
    vectors = [{f"{key}.weight": torch.randn(8, 4, generator=g, dtype=torch.float64)} for _ in range(2)]
    paths = [tmp_path / f"task{k}.safetensors" for k in range(2)]
    for path in paths:
        save_weights({f"{key}.{form}": stored.double()}, path, {"adapter": "open_clip_vit"})
    features = [load_features(path) for path in paths]
    if not from_file:  # as capture() hands them over in memory
        features = [(*layer_inputs({f"{key}.{form}": stored.double()}, str(path)), meta) for path, (_, _, meta) in zip(paths, features)]
    problem = rf": {key}.{form} is \({stored.shape[0]}, 5\); the weight {key}.weight it feeds takes inputs of width 4$"
    with pytest.raises(ArtifactError, match=named(paths[0], problem)):
        cat_merge.compute_removals(pretrained, vectors, features, CatParams(c=1), [str(p) for p in paths])


@pytest.mark.parametrize("bad", BAD)
def test_nonfinite_features_are_refused_naming_file_and_key(tmp_path, bad):
    path = tmp_path / "mnist.safetensors"
    rows = torch.ones(3, 4)
    rows[1, 2] = bad
    save_weights({"x.rows": rows, "ln.sum_squares": torch.ones(4)}, path, {"adapter": "open_clip_vit"})
    linear, sums, _ = load_features(path)
    assert torch.equal(sums["ln"], torch.ones(4, dtype=torch.float64))  # the finite input reads fine
    with pytest.raises(ArtifactError, match=named(path, r": x.rows contains NaN or Inf$")):
        linear["x"]
    with pytest.raises(ArtifactError, match=named(path, r": x.rows contains NaN or Inf$")):
        layer_inputs({"x.rows": rows}, str(path))


@pytest.mark.parametrize(
    ("expert", "problem"),
    [
        ({"a": torch.ones(2, 2), "b": torch.zeros(3), "extra": torch.zeros(1)}, r"keys differ from the pretrained model \(missing \[\], extra \['extra'\]\)"),
        ({"a": torch.ones(2, 2, dtype=torch.float64), "b": torch.zeros(3)}, r"a is \(2, 2\) torch.float64, pretrained is \(2, 2\) torch.float32"),
        ({"a": torch.ones(2, 3), "b": torch.zeros(3)}, r"a is \(2, 3\) torch.float32, pretrained is \(2, 2\) torch.float32"),
    ],
    ids=["extra-key", "dtype", "shape"],
)
def test_expert_that_does_not_fit_the_pretrained_model_is_refused_naming_it(tmp_path, expert, problem):
    pretrained, path = tmp_path / "image_tower.safetensors", tmp_path / "expert.safetensors"
    save_weights({"a": torch.ones(2, 2), "b": torch.zeros(3)}, pretrained)
    save_weights(expert, path)
    with pytest.raises(ArtifactError, match=named(path, ": " + problem)):
        task_vector(WeightsFile(pretrained), WeightsFile(path), str(path))
