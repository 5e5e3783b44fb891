"""The temporary Prefect server a flow starts, and the one a SIGKILLed flow left behind.

Without PREFECT_API_URL, Prefect starts a temporary API server (a `uvicorn ...
prefect.server.api.server:create_app` child process) and stops it at exit. A flow killed by SIGKILL
runs no exit handler, so its server keeps running, orphaned. Each flow therefore records its server
in `.catmerge/prefect-server.json`, and the next flow in the project stops a recorded server whose
flow is gone. Processes are named by pid and start time, so a reused pid is never taken for them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from catmerge.io import atomic_path

RECORD = Path(".catmerge/prefect-server.json")
SERVER_MARK = "prefect.server.api.server:create_app"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None when it is gone (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[1]), int(fields[19])


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _same_process(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == started


def server_children(pid: int | None = None) -> list[int]:
    """Pids of the temporary Prefect servers that are children of `pid` (this process by default)."""
    parent = os.getpid() if pid is None else pid
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(proc.name))
        if stat is not None and stat[0] == parent and SERVER_MARK in _command(int(proc.name)):
            found.append(int(proc.name))
    return sorted(found)


def stop_orphaned_server(project: Path, grace_seconds: float = 5.0) -> int | None:
    """Stop the server a dead flow of this project left running; its pid, or None if there was none."""
    record_path = project / RECORD
    try:
        record = json.loads(record_path.read_text())
        flow_pid, flow_started = int(record["flow_pid"]), int(record["flow_started"])
        server_pid, server_started = int(record["server_pid"]), int(record["server_started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record, or one we cannot read: nothing is known to be ours
    if _same_process(flow_pid, flow_started):
        return None  # its flow is still running (a second flow is refused by the workspace lock)
    if not _same_process(server_pid, server_started) or SERVER_MARK not in _command(server_pid):
        record_path.unlink(missing_ok=True)
        return None
    os.kill(server_pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while _same_process(server_pid, server_started) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _same_process(server_pid, server_started):
        os.kill(server_pid, signal.SIGKILL)
    record_path.unlink(missing_ok=True)
    return server_pid


def record_server(project: Path) -> int | None:
    """Note this flow's temporary server (if Prefect started one) for the next flow to clean up after."""
    servers = server_children()
    me = _stat(os.getpid())
    if not servers or me is None:
        return None
    server = _stat(servers[0])
    if server is None:
        return None
    record = {"flow_pid": os.getpid(), "flow_started": me[1], "server_pid": servers[0], "server_started": server[1]}
    with atomic_path(project / RECORD) as tmp:
        tmp.write_text(json.dumps(record))
    return servers[0]
