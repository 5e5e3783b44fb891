"""What the flows ask of DVC: the stage order, one stage reproduced, param overrides, experiments.

DVC stays the single source of truth for staleness (dvc.lock): a stage task never decides itself
whether to run, it asks `dvc repro --single-item` and reports what DVC did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from catmerge.cli import PARAMS_CHANGED, PARAMS_DIGEST_ENV, params_digests
from catmerge.io import atomic_path
from catmerge.params import ParamsError, load_params
from catmerge.workspace_lock import HOLDER_ENV, held_lock_fds

DVC = [sys.executable, "-m", "dvc"]


class StageFailed(RuntimeError):
    """A stage exited with an error; the message is the stage's own. `permanent`: the stage said
    its input or params are wrong (`[stage] error: ...`), so running it again cannot help."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool  # False: DVC found it up to date and skipped it
    seconds: float
    restored: bool = False  # ran from DVC's run cache: outputs of an identical earlier run checked out


def stage_order(project: Path) -> list[str]:
    """Every stage of dvc.yaml (foreach items expanded), dependencies first, dvc.yaml order otherwise."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        stages = list(repo.index.stages)
        position = {stage: i for i, stage in enumerate(stages)}
        graph = repo.index.graph.reverse()  # edges from a dependency to its dependents
        return [s.name for s in nx.lexicographical_topological_sort(graph, key=lambda s: position[s])]


def stage_group(stage: str) -> str:
    """`experts@mnist` -> `experts`: per-task stages form one group."""
    return stage.split("@", 1)[0]


def _pump(stream, sink, keep: list[bytes]) -> None:
    """Copy a child's output to ours as it comes (progress bars included) and keep it."""
    for chunk in iter(lambda: stream.read1(4096), b""):
        keep.append(chunk)
        if sink is not None:
            sink.write(chunk)
            sink.flush()


def run_dvc(
    args: list[str], project: Path, echo: bool = True, env: dict | None = None, timeout: float | None = None
) -> tuple[int, str, str]:
    """Run a DVC command in `project`, streaming its output live; returns (code, stdout, stderr).
    Past `timeout` seconds the command and its children are killed and StageFailed is raised."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.Popen(
        DVC + args, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, start_new_session=True,
        pass_fds=held_lock_fds(),  # the workspace stays locked while DVC runs, even if we die
    )
    out: list[bytes] = []
    err: list[bytes] = []
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout.buffer if echo else None, out)),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr.buffer if echo else None, err)),
    ]
    for pump in pumps:
        pump.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process too, not only dvc
        proc.wait()
        raise StageFailed(f"dvc {' '.join(args)}: timed out after {timeout:.0f} s") from None
    except BaseException:  # Ctrl-C, a cancelled flow: stop DVC and its stage before the workspace lock is let go
        _stop(proc)
        raise
    finally:
        for pump in pumps:
            pump.join()
    return code, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")


def _stop(proc: subprocess.Popen) -> None:
    """End a DVC command we started and its stage: politely, then for good."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def error_message(stage: str, stdout: str, stderr: str) -> str:
    """The stage's own error line(s) (`[stage] error: ...`) or else DVC's `ERROR:` lines."""
    lines = (stdout + "\n" + stderr).splitlines()
    own = [line for line in lines if "] error:" in line or "] transient error:" in line]
    own_block = []
    if own:  # the stage's message may continue on indented lines (params errors list every key)
        start = lines.index(own[0])
        own_block = [lines[start]] + [line for line in lines[start + 1 :] if line.startswith("  ")]
    dvc_errors = [line for line in lines if line.startswith("ERROR:")]
    return "\n".join(own_block or dvc_errors or lines[-5:]) or f"stage {stage} failed"


def stage_failure(stage: str, stdout: str, stderr: str) -> StageFailed:
    """The failure of `stage` from its output: permanent when the stage itself said its input or
    params are wrong (`[stage] error: ...`), not when it said `transient error` or crashed."""
    message = error_message(stage, stdout, stderr)
    return StageFailed(f"{stage}: {message}", permanent=f"[{stage_group(stage)}] error:" in message)


# DVC's refusals while another DVC command holds its repo lock or the paths of a running stage;
# and a stage's, when such a command rewrote params.yaml in a gap between two of our stages
DVC_BUSY = ("Unable to acquire lock", "is busy, it is being blocked by", PARAMS_CHANGED)


def params_snapshot(project: Path, overrides: list[str]) -> dict[str, str]:
    """The params files a run depends on (params.yaml and every file it overrides), as text."""
    names = {"params.yaml"}
    if overrides:
        from dvc.utils.cli_parse import to_path_overrides

        names |= set(to_path_overrides(overrides))
    return {name: (project / name).read_text() for name in sorted(names) if (project / name).is_file()}


def restore_params(project: Path, snapshot: dict[str, str]) -> list[str]:
    """Put back every params file of `snapshot` that another command changed; returns their names.
    A `dvc exp run -S` that got in between two stages of a run must not leave params.yaml with a
    mix of its overrides and the run's."""
    restored = []
    for name, text in snapshot.items():
        path = project / name
        if not path.is_file() or path.read_text() != text:
            with atomic_path(path.resolve() if path.is_symlink() else path) as tmp:
                tmp.write_text(text)
                if path.exists():
                    shutil.copymode(path, tmp)
            restored.append(name)
    if restored:
        print(f"{', '.join(restored)} {PARAMS_CHANGED}; put back as this run set it", file=sys.stderr, flush=True)
    return restored


def reproduce(
    stage: str, project: Path, echo: bool = True, timeout_seconds: float | None = None, busy_wait_seconds: float = 600.0,
    snapshot: dict[str, str] | None = None,
) -> StageOutcome:
    """`dvc repro --single-item <stage>`: DVC runs it if stale, skips it otherwise. While another
    DVC command holds DVC's locks (a `dvc status`, or a `dvc repro` our workspace lock is about to
    refuse), it is asked again every few seconds, for up to `busy_wait_seconds`. With `snapshot`
    (the run's params files), each attempt first puts back any of them another command changed,
    and the stage checks that they are still so when it starts."""
    start = time.perf_counter()
    # Progress bars are shown to a person even though the stage's output goes through a pipe; the
    # flow holds the workspace lock (catmerge/workspace_lock.py), and its stages go in under it.
    env = {"CATMERGE_PROGRESS": "always", HOLDER_ENV: str(os.getpid())}
    while True:
        if snapshot:
            restore_params(project, snapshot)
            env[PARAMS_DIGEST_ENV] = json.dumps(params_digests(project, list(snapshot)))
        code, stdout, stderr = run_dvc(["repro", "--single-item", stage], project, echo, env, timeout_seconds)
        busy = code != 0 and any(sign in stdout + stderr for sign in DVC_BUSY)
        if not busy or time.perf_counter() - start > busy_wait_seconds:
            break
        print(f"{stage}: another DVC command holds DVC's lock; asking again in 5 s", file=sys.stderr, flush=True)
        time.sleep(5)
    if code != 0:
        raise stage_failure(stage, stdout, stderr)
    restored = f"Stage '{stage}' is cached - skipping run" in stdout
    ran = f"Running stage '{stage}'" in stdout or restored
    return StageOutcome(stage, ran, time.perf_counter() - start, restored)


def apply_overrides(project: Path, overrides: list[str]) -> None:
    """Set params the way `dvc exp run -S` does (same syntax: `[file:]key=value`, Hydra grammar),
    validating the result before any file is replaced, so a bad override changes nothing."""
    if not overrides:
        return
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    with tempfile.TemporaryDirectory() as scratch:
        # every file edited and checked first, in a scratch directory under its own name (DVC
        # picks the format by the suffix): a bad override in any of them changes none
        edited = {}
        for name, file_overrides in to_path_overrides(overrides).items():
            path = (project / name).resolve()  # a symlinked params file keeps its link
            edited[path] = Path(scratch) / f"{len(edited)}-{path.name}"
            shutil.copyfile(path, edited[path])
            dvc_apply_overrides(str(edited[path]), file_overrides)
            if Path(name).name == "params.yaml":
                try:
                    load_params(edited[path])
                except ParamsError as exc:  # name the real file and the overrides, not the temp copy
                    raise ParamsError(str(exc).replace(str(edited[path]), f"{project / name} with {' '.join(file_overrides)}")) from None
        for path, new in edited.items():
            with atomic_path(path) as tmp:
                shutil.copyfile(new, tmp)
                shutil.copymode(path, tmp)


def save_experiment(project: Path, name: str | None) -> str:
    """Record the workspace as a DVC experiment (what `dvc exp run` leaves behind)."""
    # dvc.lock and the metrics are git files that a fresh project may not have committed yet
    untracked = [a for path in ("dvc.lock", "metrics") if (project / path).exists() for a in ("--include-untracked", path)]
    args = ["exp", "save", "--force", *untracked] + (["--name", name] if name else [])
    code, stdout, stderr = run_dvc(args, project, echo=False)
    if code != 0:
        raise StageFailed(f"dvc exp save: {error_message('exp save', stdout, stderr)}")
    return (stdout.strip().splitlines() or [""])[-1]
