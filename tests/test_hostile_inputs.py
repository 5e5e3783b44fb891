"""Reliability, round two: what a hostile or careless user tried on a built project, and what
catmerge does about it (docs/reliability.md, "Round two"). Bad params rows are in test_params.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_reliability import DVC, hashes, stage

from catmerge import io as cio
from catmerge.cli import PARAMS_CHANGED, ParamsChanged, _check_params_unchanged, run_stage
from catmerge.io import ArtifactError, WeightsFile, atomic_dir, atomic_path, confined_writes, save_weights
from catmerge.task_vectors import load_task_vector
from catmerge.workspace_lock import WorkspaceBusy, dvc_lock_while_running, workspace_lock
from conftest import run

# ---- names that become paths, writes that leave the project ---------------------------------


def test_writes_outside_the_project_are_refused_and_what_is_there_is_kept(tmp_path):
    root, outside = tmp_path / "project", tmp_path / "somewhere"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    with confined_writes(root):
        for target in (root / "data/datasets/../../../somewhere", outside, Path("/somewhere-else")):
            with pytest.raises(ArtifactError, match=r"refusing to write .*outside the project"), atomic_dir(target):
                pass
        with pytest.raises(ArtifactError, match="refusing to write"), atomic_path(root / "data/../../x.json"):
            pass
        with pytest.raises(ArtifactError, match="refusing to write"):
            save_weights({"a": torch.zeros(2)}, outside / "a.safetensors")
        save_weights({"a": torch.zeros(2)}, root / "data" / "a.safetensors")  # inside: fine
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert (outside / "precious.txt").read_text() == "keep me"
    assert (root / "data/a.safetensors").is_file()


def test_a_hub_task_named_like_a_path_stops_the_datasets_stage_before_anything_outside_is_touched(tmp_path, monkeypatch, capsys):
    """source hf: a task `../../../somewhere` with a hub.datasets entry used to pass params and make
    `python -m stages.datasets` replace <project>/../somewhere (atomic_dir moves the old directory
    aside and deletes it). Params refuse the name; with that check gone, the write guard refuses
    the write before anything is moved or deleted."""
    import copy

    import stages.datasets as datasets_stage
    from catmerge import params as cparams
    from conftest import MICRO_PARAMS, write_params

    root, outside = tmp_path / "project", tmp_path / "somewhere"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep/precious.txt").write_text("keep me")
    root.mkdir()
    bad = "../../../somewhere"
    params = copy.deepcopy(MICRO_PARAMS)
    params.update(source="hf", model="hf-clip-vit-b-32", pretrain=None, finetune=None, tasks=["mnist", bad])
    params["hub"]["datasets"] = {bad: {"repo": "someone/somewhere", "templates": ["a photo of {}."]}}
    write_params(root / "params.yaml", params)
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["stages.datasets", bad])

    def datasets_stage_error() -> str:
        with pytest.raises(SystemExit) as stopped:
            run_stage("datasets", datasets_stage.main)
        assert stopped.value.code == 2
        return capsys.readouterr().err

    assert "hub.datasets key (a task name): '../../../somewhere' is not a plain name" in datasets_stage_error()
    monkeypatch.setattr(cparams, "check_plain_name", lambda name, where: name)  # as if a new key slipped past params
    monkeypatch.setattr(datasets_stage, "hub_splits", lambda params, task: ({}, {"class_names": ["a"]}))
    err = datasets_stage_error()
    assert re.fullmatch(r"\[datasets\] error: refusing to write data/datasets/\.\./\.\./\.\./somewhere: it resolves to "
                        rf"{re.escape(str(outside))}, outside the project {re.escape(str(root))}.*\n", err)
    touched = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.parts[len(tmp_path.parts)] != "project")
    assert touched == ["somewhere", "somewhere/keep", "somewhere/keep/precious.txt"]
    assert (outside / "keep/precious.txt").read_text() == "keep me"
    assert not (root / "data").exists()


def test_temporaries_are_made_outside_dvc_tracked_directories(tmp_path):
    """A `dvc checkout --force` (which `dvc exp run` does) deletes unknown files inside a tracked
    directory: a stage's temporaries there would vanish mid-write."""
    root = tmp_path / "project"
    tracked = root / "data/task_vectors"
    tracked.mkdir(parents=True)
    with confined_writes(root):
        with atomic_path(tracked / "mnist.safetensors") as tmp:
            assert tmp.parent == root / ".catmerge/tmp"
            tmp.write_bytes(b"x")
            assert list(tracked.iterdir()) == []
        with atomic_dir(root / "data/bases") as tmp:
            assert tmp.parent == root / ".catmerge/tmp"
            (tmp / "f").write_text("1")
        with atomic_dir(root / "data/bases") as tmp:  # replacing: the old one goes aside there too
            (tmp / "f").write_text("2")
    assert (tracked / "mnist.safetensors").read_bytes() == b"x"
    assert (root / "data/bases/f").read_text() == "2"
    assert list((root / ".catmerge/tmp").iterdir()) == []
    assert sorted(p.name for p in (root / "data").iterdir()) == ["bases", "task_vectors"]


# ---- artifacts checked against their manifests and their own metadata -----------------------


def test_a_task_vector_in_another_dtype_than_its_metadata_says_is_refused(tmp_path):
    pretrained = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    path = tmp_path / "mnist.safetensors"
    save_file({"w": torch.ones(2, 2, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float16)}, str(path),
              {"catmerge": json.dumps({"task": "mnist", "dtype": "float64"})})
    with pytest.raises(ArtifactError, match=r"mnist.safetensors: b is torch.float16, but its metadata says torch.float64"):
        load_task_vector(pretrained, path, "mnist")


def test_a_task_vector_saying_another_task_is_refused(tmp_path):
    pretrained = {"w": torch.zeros(2)}
    path = tmp_path / "mnist.safetensors"
    save_weights({"w": torch.ones(2, dtype=torch.float64)}, path, {"task": "digits", "dtype": "float64"})
    with pytest.raises(ArtifactError, match=r"mnist.safetensors: its metadata says task 'digits', expected 'mnist'"):
        load_task_vector(pretrained, path, "mnist")
    assert load_task_vector(pretrained, path, "digits")["w"].tolist() == [1.0, 1.0]


def copy_over(directory: Path, source: str, target: str, fix_manifest: bool) -> None:
    """`<source>.safetensors` copied over `<target>.safetensors`; with `fix_manifest`, the target's
    manifest rewritten to vouch for the copy (as someone who knows the format would)."""
    (directory / f"{target}.safetensors").unlink()
    (directory / f"{target}.safetensors").write_bytes((directory / f"{source}.safetensors").read_bytes())
    if fix_manifest:
        manifest = json.loads((directory / f"{target}.manifest.json").read_text())
        manifest["files"][0]["sha256"] = json.loads((directory / f"{source}.manifest.json").read_text())["files"][0]["sha256"]
        (directory / f"{target}.manifest.json").write_text(json.dumps(manifest))


def test_merge_refuses_swapped_or_rewritten_task_vectors_and_keeps_the_merged_models(project):
    before = hashes(project, "data/merged")
    tv = project / "data/task_vectors"
    data = bytearray((tv / "mnist.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a changed entry, the header intact: the manifest's sha256 gives it away
    (tv / "mnist.safetensors").unlink()
    (tv / "mnist.safetensors").write_bytes(bytes(data))
    proc = stage(project, ["merge"], check=False)
    assert proc.returncode == 2
    assert "[merge] error: data/task_vectors/mnist.safetensors: sha256" in proc.stderr and "mnist.manifest.json" in proc.stderr
    # another task's file, even with the manifest made to fit: its own metadata (checked before any hashing)
    copy_over(tv, "textures", "mnist", fix_manifest=True)
    proc = stage(project, ["merge"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "[merge] error:" in proc.stderr and "its metadata says task 'textures', expected 'mnist'" in proc.stderr
    assert "merged " not in proc.stdout  # refused before the first model
    assert hashes(project, "data/merged") == before


def test_features_of_another_task_are_refused(project):
    features = project / "data/features"
    copy_over(features, "textures", "mnist", fix_manifest=True)
    before = hashes(project, "data/bases")
    proc = stage(project, ["bases"], check=False)
    assert proc.returncode == 2
    assert "data/features/mnist.safetensors: its metadata says task 'textures', expected 'mnist'" in proc.stderr
    assert hashes(project, "data/bases") == before


def test_merge_checks_cats_bases_before_writing_any_model(project):
    before = hashes(project, "data/merged")
    basis = project / "data/bases/mnist.safetensors"
    data = bytearray(basis.read_bytes())
    data[-1] ^= 0xFF
    basis.unlink()
    basis.write_bytes(bytes(data))
    proc = stage(project, ["merge"], check=False)
    assert proc.returncode == 2
    assert "data/bases/mnist.safetensors: sha256" in proc.stderr
    assert "merged " not in proc.stdout
    assert hashes(project, "data/merged") == before


def test_a_zero_byte_merged_model_stops_evaluate_before_scoring_and_the_metrics_stay(project):
    before = hashes(project, "metrics")
    merged = project / "data/merged/ties.safetensors"
    merged.unlink()
    merged.write_bytes(b"")
    proc = stage(project, ["evaluate"], check=False)
    assert proc.returncode == 2
    assert "[evaluate] error: data/merged/ties.safetensors: sha256" in proc.stderr
    assert hashes(project, "metrics") == before
    # under DVC too: evaluate's outputs are persistent, so DVC does not delete them before the stage fails
    proc = run(DVC + ["repro", "--single-item", "evaluate"], project, check=False)
    assert proc.returncode != 0 and "data/merged/ties.safetensors: sha256" in proc.stdout + proc.stderr
    assert hashes(project, "metrics") == before
    # a merged file that says it is another method (manifest rewritten to match) is refused as well
    (project / "data/merged/ties.safetensors").unlink()
    (project / "data/merged/ties.safetensors").write_bytes((project / "data/merged/pcb.safetensors").read_bytes())
    manifest = json.loads((project / "data/merged/manifest.json").read_text())
    by_path = {r["path"]: r for r in manifest["files"]}
    by_path["ties.safetensors"]["sha256"] = by_path["pcb.safetensors"]["sha256"]
    (project / "data/merged/manifest.json").write_text(json.dumps(manifest))
    proc = stage(project, ["evaluate"], check=False)
    assert proc.returncode == 2 and "ties.safetensors: its metadata says method 'pcb', expected 'ties'" in proc.stderr


def test_a_missing_or_stale_selection_is_named_with_what_to_run_and_the_merged_models_stay(project):
    before = hashes(project, "data/merged")
    selection = project / "metrics/selection.json"
    kept = selection.read_text()
    selection.unlink()
    proc = stage(project, ["merge"], check=False)
    assert proc.returncode == 2
    assert "[merge] error: missing metrics/selection.json (written by stage select): run stage select first (dvc repro select)" in proc.stderr
    proc = run(DVC + ["repro", "--single-item", "merge"], project, check=False)  # DVC refuses the missing dep itself
    assert proc.returncode != 0 and "selection.json" in proc.stdout + proc.stderr
    assert hashes(project, "data/merged") == before  # persistent: not deleted before the failure
    selection.write_text(kept)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["select"]["pcb"] == {"alpha": [0.5, 1.0]}
    params["select"]["pcb"]["alpha"] = [0.5, 2.0]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = stage(project, ["merge"], check=False)
    assert proc.returncode == 2
    assert "metrics/selection.json: chosen on the grid {'alpha': [0.5, 1.0]} for pcb, params.yaml has {'alpha': [0.5, 2.0]} now" in proc.stderr


# ---- the score cache ----------------------------------------------------------------------


def test_cache_entries_that_are_invented_damaged_or_for_other_inputs_are_recomputed(project):
    cache = project / "data/select_cache"
    entries = sorted(cache.glob("ties-*.json"))
    assert len(entries) == 4
    invented = json.loads(entries[0].read_text())
    invented["scores"] = dict.fromkeys(invented["scores"], 100.0)
    entries[0].write_text(json.dumps(invented))  # edited by hand: the checksum no longer fits
    entries[1].write_text(entries[1].read_text()[:40])  # truncated
    forged = json.loads(entries[2].read_text())
    del forged["scores"]
    entries[2].write_text(json.dumps(forged))  # a key missing
    other = json.loads(entries[3].read_text())
    other["tasks"] = other["tasks"][:2]  # made for another task set, checksum recomputed to fit
    body = {k: v for k, v in other.items() if k != "sha256"}
    other["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    entries[3].write_text(json.dumps(other))
    before = json.loads((project / "metrics/selection.json").read_text())

    proc = stage(project, ["select"])
    log = proc.stdout
    assert (f"select: cache entry {entries[0].relative_to(project)} ignored (its checksum does not match its content: "
            "edited or damaged); scoring again") in log
    assert f"select: cache entry {entries[1].relative_to(project)} ignored (unreadable: JSONDecodeError" in log
    assert f"select: cache entry {entries[2].relative_to(project)} ignored (its checksum does not match" in log
    assert f"select: cache entry {entries[3].relative_to(project)} ignored (recorded tasks differ from this run's); scoring again" in log
    assert "select: 15 candidates, 11 from the cache, 4 to score on val" in log
    assert re.search(r"select: \d+\.\d s for the first candidate; about (\d+ min )?\d+ s for the other 3", log)
    after = json.loads((project / "metrics/selection.json").read_text())
    assert after["methods"]["ties"] == before["methods"]["ties"]  # the same scores as before the tampering
    for entry in entries:
        assert json.loads(entry.read_text())["scores"] != invented["scores"]


def test_a_large_grid_is_estimated_from_the_times_the_cache_records(tmp_path):
    from catmerge.selection import cost_estimate

    cache = tmp_path / "select_cache"
    cache.mkdir()
    for i, seconds in enumerate([2.0, 3.0, 100.0]):  # the median: one slow run does not skew it
        (cache / f"ties-{i}.json").write_text(json.dumps({"method": "ties", "seconds": seconds}))
    (cache / "pcb-0.json").write_text(json.dumps({"method": "pcb", "seconds": 1.5}))
    for i, junk in enumerate(["{not json", json.dumps({"method": "pcb", "seconds": "fast"}), json.dumps(["pcb"]),
                              json.dumps({"method": ["pcb"], "seconds": 1}), json.dumps({"method": "pcb", "seconds": float("inf")})]):
        (cache / f"pcb-junk{i}.json").write_text(junk)  # passed over: only an estimate reads them
    assert cost_estimate(cache, {"ties": 60, "pcb": 40}, 100) is None  # at the threshold: nothing to say
    assert cost_estimate(cache, {"ties": 100, "pcb": 40, "wudi": 5, "cat": 0}, 100) == (
        f"select: 145 candidates to score (more than select_limits.warn_candidates = 100); about 6 min 00 s at the times {cache} "
        "records (ties 100 x 3.0 s, pcb 40 x 1.5 s); wudi 5: no time recorded yet, known after the first candidate")
    assert cost_estimate(tmp_path / "none", {"wudi": 101}, 100) == (
        "select: 101 candidates to score (more than select_limits.warn_candidates = 100); wudi 101: no time recorded yet, "
        "known after the first candidate")


def test_select_says_what_a_large_grid_will_cost_before_scoring_it(tmp_path, monkeypatch):
    import copy
    from types import SimpleNamespace

    from catmerge import selection
    from catmerge.params import Params
    from conftest import MICRO_PARAMS

    params = Params.model_validate({**copy.deepcopy(MICRO_PARAMS), "merge": {"methods": ["task_arithmetic", "ties"]},
                                    "select": {"ties": {"alpha": [1.0, 2.0, 3.0]}},
                                    "select_limits": {"max_candidates": 1000, "warn_candidates": 3}})
    log: list[str] = []
    ws = SimpleNamespace(params=params, check_inputs=lambda *a: None, merged=lambda method, chosen: chosen,
                         score=lambda merged, split: log.append("(scoring)") or dict.fromkeys(params.tasks, 50.0))
    monkeypatch.setattr(selection, "inputs_digest", lambda ws: "0" * 64)
    monkeypatch.setattr(selection, "code_digest", lambda method: "code")
    cache = tmp_path / "select_cache"
    cache.mkdir()
    (cache / "ties-from-another-run.json").write_text(json.dumps({"method": "ties", "seconds": 4.0}))
    selection.select(ws, cache, log=log.append)
    estimate = (f"select: 4 candidates to score (more than select_limits.warn_candidates = 3); about 12 s at the times {cache} "
                "records (ties 3 x 4.0 s); task_arithmetic 1: no time recorded yet, known after the first candidate")
    assert log[:3] == ["select: 4 candidates, 0 from the cache, 4 to score on val", estimate, "(scoring)"]
    log.clear()
    selection.select(ws, cache, log=log.append)  # all cached now: nothing to estimate
    assert log[0] == "select: 4 candidates, 4 from the cache, 0 to score on val" and not any("warn_candidates" in line for line in log)


# ---- one-line errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raised, expected, code",
    [
        (OSError(errno.ENOSPC, "No space left on device", "data/merged/cat.safetensors"),
         "[demo] error: data/merged/cat.safetensors: No space left on device", 2),
        (PermissionError(errno.EACCES, "Permission denied", "data/merged"), "[demo] error: data/merged: Permission denied", 2),
        (OSError(errno.EROFS, "Read-only file system", "metrics/metrics.json"), "[demo] error: metrics/metrics.json: Read-only file system", 2),
        (KeyboardInterrupt(), "[demo] interrupted: outputs already in place are whole, the others were not written", 130),
    ],
    ids=["disk-full", "permission", "read-only", "ctrl-c"],
)
def test_faults_end_a_stage_with_one_line(tmp_path, monkeypatch, capsys, raised, expected, code):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.demo"])

    def main():
        raise raised

    with pytest.raises(SystemExit) as stopped:
        run_stage("demo", main)
    assert stopped.value.code == code
    err = capsys.readouterr().err
    assert err.strip() == expected


@pytest.mark.parametrize(
    "header, problem",
    [
        (b"", r"0 bytes, too short for a safetensors header"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", r"the header is not JSON"),
        (b"\xff\xff\xff\xff\x00\x00\x00\x00{}", r"the header claims 4294967295 bytes"),
    ],
    ids=["empty", "not-json", "too-long"],
)
def test_broken_safetensors_headers_are_one_line_errors_naming_the_file(tmp_path, header, problem):
    path = tmp_path / "w.safetensors"
    path.write_bytes(header)
    with pytest.raises(ArtifactError, match=rf"cannot read safetensors file .*w.safetensors: {problem}"):
        WeightsFile(path)


def test_metadata_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(path), {"catmerge": "{oops"})
    with pytest.raises(ArtifactError, match=r"w.safetensors: its 'catmerge' metadata is not JSON"):
        WeightsFile(path)


@pytest.mark.parametrize("content", [b"{oops", b"\xff\xfe\x00 not even text"], ids=["not-json", "not-utf8"])
def test_a_json_file_that_is_not_json_is_named(tmp_path, content):
    path = tmp_path / "info.json"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=rf"invalid JSON in {re.escape(str(path))}: ") as caught:
        cio.read_json(path)
    assert "\n" not in str(caught.value)


# ---- reading large files ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_weights_file_reads_the_header_once_and_gives_safetensors_bytes(tmp_path, monkeypatch, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.randn(3, i + 1, generator=generator) * 10).to(dtype) for i in range(5)}
    tensors["empty"] = torch.zeros(0, 4, dtype=dtype)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    calls = []
    real = cio.read_header
    monkeypatch.setattr(cio, "read_header", lambda p: calls.append(p) or real(p))
    weights = WeightsFile(path)
    read = {k: weights[k] for k in weights}
    assert len(calls) == 1  # not once per tensor: a 50 MB header made every read slow
    expected = load_file(str(path))
    assert set(read) == set(expected)
    for key, value in expected.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value)


# ---- concurrent commands ----------------------------------------------------------------------


def test_a_dvc_exp_run_during_a_stage_is_refused_before_it_touches_params_yaml(project):
    """A running stage holds DVC's repo lock (DVC lets it go while a stage's command runs)."""
    params = (project / "params.yaml").read_text()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with dvc_lock_while_running(project) as held:
        assert held
        proc = subprocess.run(DVC + ["exp", "run", "-S", "task_arithmetic.alpha=0.5"], cwd=project, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "Unable to acquire lock" in proc.stderr + proc.stdout
    assert (project / "params.yaml").read_text() == params


def test_a_flow_puts_back_params_another_command_changed_between_its_stages(tmp_path, monkeypatch):
    from flows import dvc_repo

    (tmp_path / "params.yaml").write_text("merge: {alpha: 0.3}\n")
    snapshot = dvc_repo.params_snapshot(tmp_path, [])
    seen = []

    def fake_run_dvc(args, project, echo=True, env=None, timeout=None):
        seen.append((project / "params.yaml").read_text())
        if len(seen) == 1:  # a `dvc exp run -S` slipped in between two stages ...
            (project / "params.yaml").write_text("merge: {alpha: 0.9}\n")
            monkeypatch.setenv(dvc_repo.PARAMS_DIGEST_ENV, env[dvc_repo.PARAMS_DIGEST_ENV])
            with pytest.raises(ParamsChanged):  # ... and the stage, seeing it, refuses to run on it
                _check_params_unchanged(project)
            return 2, "", f"[merge] error: params.yaml: {PARAMS_CHANGED}\n"
        _check_params_unchanged(project)
        return 0, "Running stage 'merge'\n", ""

    monkeypatch.setattr(dvc_repo, "run_dvc", fake_run_dvc)
    monkeypatch.setattr(dvc_repo.time, "sleep", lambda s: None)
    outcome = dvc_repo.reproduce("merge", tmp_path, echo=False, snapshot=snapshot)
    assert outcome.ran and len(seen) == 2
    assert seen == ["merge: {alpha: 0.3}\n", "merge: {alpha: 0.3}\n"]  # put back before the retry
    assert (tmp_path / "params.yaml").read_text() == "merge: {alpha: 0.3}\n"


def test_the_next_flow_stops_the_prefect_server_a_killed_flow_left_and_nothing_else(tmp_path):
    from flows import prefect_server

    fake_server = [sys.executable, "-c", "import time; time.sleep(120)", prefect_server.SERVER_MARK]
    server = subprocess.Popen(fake_server)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # not a server
    try:
        deadline = time.time() + 30
        while prefect_server.SERVER_MARK not in prefect_server._command(server.pid):
            assert time.time() < deadline
            time.sleep(0.05)
        assert prefect_server.record_server(tmp_path) == server.pid  # our child: recorded as this flow's
        record_path = tmp_path / prefect_server.RECORD
        record = json.loads(record_path.read_text())
        assert record["flow_pid"] == os.getpid()
        assert prefect_server.stop_orphaned_server(tmp_path) is None  # its flow (us) lives: left alone
        assert server.poll() is None
        dead = subprocess.Popen(["true"])
        dead.wait()
        record_path.write_text(json.dumps(dict(record, flow_pid=dead.pid)))  # its flow was killed
        wrong_start = dict(record, flow_pid=dead.pid, server_started=record["server_started"] + 1)
        record_path.write_text(json.dumps(wrong_start))  # a pid reused by another process is not it
        assert prefect_server.stop_orphaned_server(tmp_path) is None and server.poll() is None
        assert not record_path.exists()
        record_path.write_text(json.dumps(dict(record, flow_pid=dead.pid, server_pid=other.pid,
                                               server_started=prefect_server._stat(other.pid)[1])))
        assert prefect_server.stop_orphaned_server(tmp_path) is None and other.poll() is None  # not a server
        record_path.write_text(json.dumps(dict(record, flow_pid=dead.pid)))
        assert prefect_server.stop_orphaned_server(tmp_path) == server.pid
        assert server.wait(timeout=30) == -signal.SIGTERM
        assert not record_path.exists()
        record_path.write_text("{not json")
        assert prefect_server.stop_orphaned_server(tmp_path) is None  # unreadable: nothing is known to be ours
    finally:
        for proc in (server, other):
            proc.kill()
            proc.wait()


def test_the_busy_message_after_a_killed_run_names_the_process_still_holding_the_lock(tmp_path):
    """A flow killed by SIGKILL hands the lock to the `dvc repro` it started; the message names that
    command, not only the dead flow."""
    script = (
        "import subprocess, sys, time\n"
        "from catmerge.workspace_lock import held_lock_fds, workspace_lock\n"
        f"with workspace_lock({str(tmp_path)!r}, command='flow catmerge-pipeline (test)'):\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], pass_fds=held_lock_fds())\n"
        "    print(child.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    flow = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(flow.stdout.readline())
    try:
        os.kill(flow.pid, signal.SIGKILL)
        flow.wait()
        with pytest.raises(WorkspaceBusy) as busy, workspace_lock(tmp_path):
            pass
        message = str(busy.value)
        assert f"pid {child} (" in message and "which a run that has since exited started" in message
        assert f"pid {flow.pid} (flow catmerge-pipeline (test)" in message
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.time() + 30
    while True:  # the holder gone, the lock is free again
        try:
            with workspace_lock(tmp_path):
                break
        except WorkspaceBusy:
            assert time.time() < deadline
            time.sleep(0.1)

