"""Artifact I/O: atomic writes, clear errors on missing or corrupt files."""

from __future__ import annotations

import pytest
import torch

from catmerge.io import ArtifactError, atomic_dir, atomic_path, load_weights, read_metadata, save_weights, sha256_file


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "w.safetensors"
    save_weights({"a": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    out = tmp_path / "experts"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("crash")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["experts"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("replaced")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_weights_round_trip_and_errors_name_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    save_weights(tensors, path, {"task": "mnist"})
    loaded = load_weights(path)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert len(sha256_file(path)) == 64
    assert read_metadata(path) == {"task": "mnist"}
    again = tmp_path / "again.safetensors"
    save_weights(tensors, again, {"task": "mnist"})
    assert again.read_bytes() == path.read_bytes()

    with pytest.raises(ArtifactError, match=r"missing weights file: .*nothing.safetensors"):
        load_weights(tmp_path / "nothing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"cannot read safetensors file .*truncated.safetensors"):
        load_weights(truncated)
