"""Artifact I/O: atomic writes, clear errors on missing or corrupt files."""

from __future__ import annotations

import os

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


def _artifact_dir(tmp_path):
    from catmerge.io import file_record, write_json

    out = tmp_path / "experts" / "mnist"
    save_weights({"w": torch.ones(4)}, out / "expert.safetensors")
    write_json({"files": [file_record(out / "expert.safetensors", out, "test")]}, out / "manifest.json")
    return out


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda out: save_weights({"w": torch.zeros(4)}, out / "expert.safetensors"),
         r"expert.safetensors: sha256 [0-9a-f]{64} does not match [0-9a-f]{64} recorded in .*manifest.json"),
        (lambda out: (out / "expert.safetensors").unlink(), r"manifest.json: lists expert.safetensors, which is missing"),
        (lambda out: _rewrite_path(out, "../../../etc/passwd"), r"manifest.json: path '../../../etc/passwd' points outside"),
        (lambda out: _rewrite_path(out, "/etc/passwd"), r"manifest.json: path '/etc/passwd' points outside"),
        (lambda out: (out / "manifest.json").write_text('{"files": "all"}'), r"manifest.json: expected a key 'files' listing"),
        (lambda out: _rewrite_path(out, 7), r"manifest.json: expected a key 'files' listing records with a 'path'"),
        (lambda out: (out / "manifest.json").write_text("{"), r"invalid JSON in .*manifest.json"),
    ],
    ids=["sha256-mismatch", "listed-file-missing", "path-escapes", "absolute-path", "no-files-list", "path-not-a-string", "corrupt-json"],
)
def test_manifest_checks_name_the_file_and_the_problem(tmp_path, tamper, message):
    from catmerge.io import verify_manifest

    out = _artifact_dir(tmp_path)
    assert verify_manifest(out)["files"][0]["path"] == "expert.safetensors"
    tamper(out)
    with pytest.raises(ArtifactError, match=message):
        verify_manifest(out)


def _rewrite_path(out, path):
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][0]["path"] = path
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_orphaned_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".w.safetensors.{dead_pid}.abc123.tmp"
    orphan.write_bytes(b"half")
    orphan_dir = tmp_path / f".w.safetensors.{dead_pid}.def456.tmp"
    orphan_dir.mkdir()
    live = tmp_path / f".w.safetensors.{os.getppid()}.xyz789.tmp"  # a writer that is still running
    live.write_bytes(b"in progress")
    other = tmp_path / f".v.safetensors.{dead_pid}.abc123.tmp"  # another target's: left to its writer
    other.write_bytes(b"half")
    odd = tmp_path / ".w.safetensors.99999999999999999999999.x.tmp"  # no pid a process can have: not ours to judge
    odd.write_bytes(b"?")
    save_weights({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    assert not orphan.exists() and not orphan_dir.exists()
    assert live.exists() and other.exists() and odd.exists()


def test_manifest_files_checked_out_as_symlinks_into_a_cache_are_accepted_and_still_hashed(tmp_path):
    """DVC may check outputs out as symlinks into .dvc/cache: the manifest's path is judged as written."""
    from catmerge.io import verify_manifest

    out = _artifact_dir(tmp_path)
    cache = tmp_path / "cache" / "ab12"
    cache.parent.mkdir()
    (out / "expert.safetensors").rename(cache)
    (out / "expert.safetensors").symlink_to(cache)
    assert verify_manifest(out, only=["expert.safetensors"])["files"][0]["path"] == "expert.safetensors"
    save_weights({"w": torch.zeros(4)}, cache)  # the cached copy changed
    with pytest.raises(ArtifactError, match="expert.safetensors: sha256 .* does not match"):
        verify_manifest(out)
    with pytest.raises(ArtifactError, match=r"manifest.json: does not list head.safetensors"):
        verify_manifest(out, only=["head.safetensors"])
