"""One pipeline run per workspace at a time.

A run (a Prefect flow, or a stage run by `dvc repro` or by hand) holds an exclusive lock on
`.catmerge/workspace.lock` in the project; a second run fails at once with `WorkspaceBusy`,
naming the holder, before it reads or writes anything. The lock is an flock: the kernel drops it
when its holder dies, even by SIGKILL, so a crashed run never leaves the workspace locked.

A flow holds ours for its whole run, and refuses to start while a DVC command holds DVC's repo
lock (`.dvc/tmp/lock`). It runs `dvc repro` once per stage, handing the lock's descriptor to each,
and its stages go in because `HOLDER_ENV` names the flow that holds the lock. A bare `dvc repro`
takes ours stage by stage, in each stage's process; between and around stages, DVC's own locks
keep two DVC commands apart (docs/reliability.md says where they do not).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .io import ArtifactError

LOCK_FILE = Path(".catmerge/workspace.lock")
DVC_LOCK_FILE = Path(".dvc/tmp/lock")
HOLDER_ENV = "CATMERGE_WORKSPACE_HOLDER"  # pid of the run holding the lock for its child stages


class WorkspaceBusy(ArtifactError):
    """Another pipeline run holds the workspace."""


def _holder_description(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    described = f"pid {holder.get('pid')} ({holder.get('command', '?')}, since {since})"
    pid = str(holder.get("pid", ""))
    if pid.isdigit() and not _alive(int(pid)):  # a killed flow: the DVC command it started holds the lock now
        openers = _live_openers(path)
        still = ", ".join(openers) if openers else "a process it started"
        return f"{still}, which a run that has since exited started ({described}); it ends when that command does"
    return described


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_openers(path: Path) -> list[str]:
    """'pid N (command)' of each other live process holding `path` open (Linux /proc): who keeps a
    lock whose recorded holder is gone."""
    target, found = str(path.resolve()), []
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        if proc.name == str(os.getpid()):
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append(f"pid {proc.name} ({command[:100]})")
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def _try_flock(path: Path):
    """An open handle holding an exclusive flock on `path`, or None when another process holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - held open for as long as the lock is
    except OSError as exc:
        raise ArtifactError(f"cannot open the lock file {path}: {exc.strerror} (the project must be writable)") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _dvc_is_running(root: Path) -> str | None:
    """The pid a DVC command holding `.dvc/tmp/lock` wrote there, or None when none holds it."""
    path = root / DVC_LOCK_FILE
    if not path.is_file():
        return None
    handle = _try_flock(path)  # DVC's lock (zc.lockfile) is an flock on the same file
    if handle is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
        return None
    return path.read_text().strip() or "?"


@contextlib.contextmanager
def workspace_lock(root: str | Path = ".", command: str | None = None, check_dvc: bool = False) -> Iterator[None]:
    """Hold the workspace at `root` for one run; raise WorkspaceBusy when another run holds it.
    A process started by the run holding it (`HOLDER_ENV` names that run) goes in without locking.
    `check_dvc`: also refuse while a DVC command is running here (a flow's check before it starts)."""
    root = Path(root)
    path = root / LOCK_FILE
    handle = _try_flock(path)
    if handle is None:
        holder = os.environ.get(HOLDER_ENV)
        if holder and _recorded_pid(path) == holder:  # held, and by the run that started us
            yield
            return
        raise WorkspaceBusy(f"workspace busy: {root.resolve()} is in use by {_holder_description(path)}; "
                            f"wait for that run to finish (lock: {path})")
    _HELD.add(handle.fileno())
    try:
        if check_dvc and (pid := _dvc_is_running(root)) is not None:
            raise WorkspaceBusy(f"workspace busy: a DVC command (pid {pid}) is running in {root.resolve()}; "
                                f"wait for it to finish (lock: {root / DVC_LOCK_FILE})")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": str(os.getpid()), "command": command or " ".join(sys.argv), "since": time.time()}))
        handle.flush()
        yield
    finally:
        _HELD.discard(handle.fileno())
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


@contextlib.contextmanager
def dvc_lock_while_running(root: str | Path = ".", wait_seconds: float = 10.0, log=None) -> Iterator[bool]:
    """Hold DVC's repo lock (`.dvc/tmp/lock`) while a stage runs; yields whether it is held.

    DVC lets its lock go while a stage's command runs (so that the command may call DVC), which
    leaves the workspace open to a second DVC command: a `dvc exp run -S` would rewrite params.yaml
    and force a checkout of every tracked directory under the running stage. Held by the stage,
    the lock makes DVC refuse such a command at its first step, before it touches anything. The
    stage calls no DVC command itself. Another DVC command already holding it (a `dvc status`)
    is waited for up to `wait_seconds`; then the stage runs without it."""
    root = Path(root)
    if not (root / ".dvc").is_dir():
        yield False
        return
    path = root / DVC_LOCK_FILE
    deadline = time.monotonic() + wait_seconds
    while (handle := _try_flock(path)) is None:
        if time.monotonic() > deadline:
            if log is not None:
                log(f"another DVC command (pid {_dvc_is_running(root)}) holds DVC's lock; running without it")
            yield False
            return
        time.sleep(0.2)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f" {os.getpid()}\n")  # what DVC's own lock holder writes there
        handle.flush()
        yield True
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def held_lock_fds() -> tuple[int, ...]:
    """The descriptors of the workspace locks this process holds. A run hands them to the DVC
    processes it starts, so the lock outlives the run itself for as long as they do: a flow killed
    while `dvc repro` runs one of its stages keeps the workspace locked until that stage ends."""
    return tuple(_HELD)


_HELD: set[int] = set()


def _recorded_pid(path: Path) -> str | None:
    try:
        return json.loads(path.read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None
