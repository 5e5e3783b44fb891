"""No silent wrong merges, and a score cache that trusts nothing (docs/reliability.md, "Input
files"): every task vector and features file a stage reads is checked against what it says of
itself (task, dtype: from the header, before anything is hashed) and against its sha256 manifest
before any work; a select cache entry that does not fit is scored again, never used, never fatal.

The stage cases call each stage's `main` in this process on a copy of the session's micro build:
they all stop before any work, so no model is loaded and nothing is scored."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_reliability import hashes

from catmerge import io as cio
from catmerge import layout
from catmerge.io import ArtifactError, WeightsFile, save_weights, write_sidecar_manifest
from catmerge.merging import cat as cat_merge
from catmerge.selection import cache_entry, cached_scores

OUTPUTS = {"features": "data/features", "bases": "data/bases", "select": "metrics", "merge": "data/merged", "evaluate": "metrics"}


@pytest.fixture()
def copy(micro_project, tmp_path, monkeypatch) -> Path:
    """A copy of the micro build, the working directory of the stage called in this process."""
    dest = tmp_path / "project"
    shutil.copytree(micro_project, dest, symlinks=True, ignore=shutil.ignore_patterns(".catmerge", ".dvc", ".git"))
    monkeypatch.chdir(dest)
    return dest


@pytest.fixture()
def hashed(monkeypatch) -> list[str]:
    """The files hashed (against a manifest) from now on."""
    seen: list[str] = []
    real = cio.sha256_file

    def counting(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(cio, "sha256_file", counting)
    return seen


def call_stage(name: str) -> None:
    main = importlib.import_module(f"stages.{name}").main
    if name == "features":
        main("mnist")
    else:
        main()


def replace(path: Path, data: bytes) -> None:
    path.unlink()  # DVC may have checked the file out as a link into its cache
    path.write_bytes(data)


def in_float16(path: Path) -> None:
    """The file rewritten with every tensor in float16, its metadata (dtype float64) kept."""
    weights = WeightsFile(path)
    tensors = {k: weights[k].to(torch.float16) for k in weights}
    path.unlink()
    save_weights(tensors, path, weights.metadata)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one entry changed, the header intact
    replace(path, bytes(data))


# ---- task vectors and features, as every stage that reads them sees them ---------------------

READERS_OF_TASK_VECTORS = ["features", "bases", "select", "merge", "evaluate"]


@pytest.mark.parametrize("stage", READERS_OF_TASK_VECTORS)
def test_a_task_vector_rewritten_in_float16_is_refused_from_its_header_before_any_work(copy, hashed, stage):
    target = copy / "data/task_vectors/mnist.safetensors"
    in_float16(target)
    before = hashes(copy, OUTPUTS[stage])
    with pytest.raises(ArtifactError) as caught:
        call_stage(stage)
    assert str(caught.value).startswith(
        "data/task_vectors/mnist.safetensors: ") and "is torch.float16, but its metadata says torch.float64" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert hashed == []  # the header said it: nothing was hashed, nothing loaded
    assert hashes(copy, OUTPUTS[stage]) == before


@pytest.mark.parametrize("stage", READERS_OF_TASK_VECTORS)
def test_another_tasks_task_vector_copied_over_one_is_refused_before_any_work(copy, hashed, stage):
    tv = copy / "data/task_vectors"
    replace(tv / "mnist.safetensors", (tv / "textures.safetensors").read_bytes())  # its manifest still says mnist's sha256
    before = hashes(copy, OUTPUTS[stage])
    with pytest.raises(ArtifactError, match=r"^data/task_vectors/mnist.safetensors: its metadata says task 'textures', expected 'mnist'$"):
        call_stage(stage)
    assert hashed == []
    assert hashes(copy, OUTPUTS[stage]) == before


@pytest.mark.parametrize("stage", ["bases", "select", "merge", "evaluate"])
def test_another_tasks_features_copied_over_one_are_refused_before_any_work(copy, hashed, stage):
    features = copy / "data/features"
    replace(features / "mnist.safetensors", (features / "textures.safetensors").read_bytes())
    before = hashes(copy, OUTPUTS[stage])
    with pytest.raises(ArtifactError, match=r"^data/features/mnist.safetensors: its metadata says task 'textures', expected 'mnist'$"):
        call_stage(stage)
    assert hashed == []
    assert hashes(copy, OUTPUTS[stage]) == before


@pytest.mark.parametrize(
    ("stage", "kind"),
    [(s, "task_vectors") for s in READERS_OF_TASK_VECTORS] + [(s, "features") for s in ["bases", "select", "merge", "evaluate"]],
)
def test_a_changed_entry_is_refused_by_its_sha256_before_any_work(copy, stage, kind):
    flip_last_byte(copy / f"data/{kind}/mnist.safetensors")
    before = hashes(copy, OUTPUTS[stage])
    with pytest.raises(ArtifactError, match=rf"^data/{kind}/mnist.safetensors: sha256 [0-9a-f]{{64}} does not match [0-9a-f]{{64}} "
                                            rf"recorded in data/{kind}/mnist.manifest.json \(changed after its stage wrote it\)$"):
        call_stage(stage)
    assert hashes(copy, OUTPUTS[stage]) == before


def test_a_basis_of_another_task_is_refused_even_with_its_manifest_made_to_fit(copy, hashed):
    bases = copy / "data/bases"
    replace(bases / "mnist.safetensors", (bases / "textures.safetensors").read_bytes())
    manifest = json.loads((bases / "manifest.json").read_text())
    by_path = {r["path"]: r for r in manifest["files"]}
    by_path["mnist.safetensors"]["sha256"] = by_path["textures.safetensors"]["sha256"]
    (bases / "manifest.json").write_text(json.dumps(manifest))
    tasks = ["mnist", "mnist_rotation", "textures"]
    with pytest.raises(ArtifactError, match=r"^data/bases/mnist.safetensors: its metadata says task 'textures', expected 'mnist'$"):
        cat_merge.read_removals(Path("data/bases"), tasks)
    assert hashed == []


# ---- the same checks, one file at a time (library use of the layout) -------------------------


def write_task_vector(root: Path, task: str, says: str | None = None, dtype: torch.dtype = torch.float64) -> Path:
    path = root / layout.task_vector_path(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"task": says or task, "dtype": "float64"}
    save_weights({"w": torch.ones(2, 2, dtype=dtype), "b": torch.ones(2, dtype=dtype)}, path, meta)
    write_sidecar_manifest(path, "task_vectors", **meta)
    return path


def test_a_task_vector_and_its_manifest_both_copied_from_another_task_are_refused(tmp_path):
    textures = write_task_vector(tmp_path, "textures")
    mnist = write_task_vector(tmp_path, "mnist")
    shutil.copy(textures, mnist)
    shutil.copy(cio.sidecar_manifest(textures), cio.sidecar_manifest(mnist))  # the sha256 fits now
    with pytest.raises(ArtifactError, match=r"mnist.safetensors: its metadata says task 'textures', expected 'mnist'$"):
        layout.checked_task_vector("mnist", tmp_path)


def test_a_manifest_saying_another_task_or_dtype_is_refused(tmp_path):
    path = write_task_vector(tmp_path, "mnist")
    manifest_path = cio.sidecar_manifest(path)
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "task": "textures"}))
    with pytest.raises(ArtifactError, match=r"mnist.manifest.json: says task 'textures', expected 'mnist'$"):
        layout.checked_task_vector("mnist", tmp_path)
    manifest_path.write_text(json.dumps({**manifest, "dtype": "float32"}))
    with pytest.raises(ArtifactError, match=r"mnist.manifest.json: records dtype 'float32', but .*mnist.safetensors says 'float64'$"):
        layout.checked_task_vector("mnist", tmp_path)


def test_a_missing_manifest_is_named(tmp_path):
    path = write_task_vector(tmp_path, "mnist")
    cio.sidecar_manifest(path).unlink()
    with pytest.raises(ArtifactError, match=r"^missing JSON file: .*data/task_vectors/mnist.manifest.json$"):
        layout.checked_task_vector("mnist", tmp_path)


def test_a_task_vector_in_float16_claiming_float64_is_refused_even_with_a_fitting_manifest(tmp_path, hashed):
    write_task_vector(tmp_path, "mnist", dtype=torch.float16)  # its manifest made for these very bytes
    hashed.clear()  # (writing the manifest hashed the file)
    with pytest.raises(ArtifactError, match=r"mnist.safetensors: b is torch.float16, but its metadata says torch.float64 "
                                            r"\(2 tensor\(s\) differ; rewritten after its stage wrote it\?\)$"):
        layout.checked_task_vector("mnist", tmp_path)
    assert hashed == []


def test_headers_are_checked_once_per_file_and_again_when_it_changes(tmp_path, monkeypatch):
    write_task_vector(tmp_path, "mnist")
    parsed: list[Path] = []
    real = cio.read_header
    monkeypatch.setattr(cio, "read_header", lambda path: parsed.append(path) or real(path))
    layout.check_headers(["mnist"], tmp_path, features=False)
    layout.checked_task_vector("mnist", tmp_path)
    assert len(parsed) == 1
    write_task_vector(tmp_path, "mnist", says="textures")  # rewritten: checked again, and refused
    with pytest.raises(ArtifactError, match="its metadata says task 'textures'"):
        layout.checked_task_vector("mnist", tmp_path)


# ---- the score cache ----------------------------------------------------------------------

TASKS = ["mnist", "textures"]
PARAMS = {"k": 20, "alpha": 0.5, "trim": "global"}
KEY = ("ties", PARAMS, "a" * 64, "c" * 64, TASKS)


def refit(entry: dict) -> dict:
    """The entry with its checksum made to fit its (changed) content, as someone who knows the format would."""
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return {**body, "sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def good_entry() -> dict:
    return cache_entry(*KEY, {"mnist": 81.25, "textures": 40.0}, 1.5)


def without(entry: dict, key: str) -> dict:
    return {k: v for k, v in entry.items() if k != key}


CACHE_CASES = {
    "invented-scores": (lambda e: {**e, "scores": {"mnist": 100.0, "textures": 100.0}}, r"its checksum does not match its content: edited or damaged"),
    "truncated": (lambda e: json.dumps(e)[:40], r"unreadable: JSONDecodeError: "),
    "empty": (lambda e: "", r"unreadable: JSONDecodeError: "),
    "not-an-object": (lambda e: [e], r"not a JSON object"),
    "scores-missing": (lambda e: refit(without(e, "scores")), r"its scores are not one accuracy in \[0, 100\] per task"),
    "checksum-missing": (lambda e: without(e, "sha256"), r"its checksum does not match"),
    "tasks-missing": (lambda e: refit(without(e, "tasks")), r"recorded tasks differ from this run's"),
    "other-task-set": (lambda e: refit({**e, "tasks": ["mnist"], "scores": {"mnist": 99.0}}), r"recorded tasks differ from this run's"),
    "other-params": (lambda e: refit({**e, "params": {**PARAMS, "alpha": 1.0}}), r"recorded params differ from this run's"),
    "other-inputs": (lambda e: refit({**e, "inputs_sha256": "b" * 64}), r"recorded inputs_sha256 differ from this run's"),
    "other-code": (lambda e: refit({**e, "code_sha256": "d" * 64}), r"recorded code_sha256 differ from this run's"),
    "other-method": (lambda e: refit({**e, "method": "pcb"}), r"recorded method differ from this run's"),
    "score-out-of-range": (lambda e: refit({**e, "scores": {"mnist": 180.0, "textures": 40.0}}), r"its scores are not one accuracy"),
    "score-not-a-number": (lambda e: refit({**e, "scores": {"mnist": "81", "textures": 40.0}}), r"its scores are not one accuracy"),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_a_cache_entry_that_does_not_fit_is_not_used_and_the_reason_is_one_line(tmp_path, case):
    damage, reason = CACHE_CASES[case]
    path = tmp_path / "ties-0.json"
    content = damage(good_entry())
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    scores, problem = cached_scores(path, *KEY)
    assert scores is None
    assert problem and "\n" not in problem
    assert re.match(reason, problem), problem


def test_a_whole_cache_entry_for_this_candidate_is_used(tmp_path):
    path = tmp_path / "ties-0.json"
    path.write_text(json.dumps(good_entry()))
    assert cached_scores(path, *KEY) == ({"mnist": 81.25, "textures": 40.0}, "")
    assert cached_scores(tmp_path / "absent.json", *KEY) == (None, "")  # not there: scored, nothing to say
