"""Fault injection for the kill tests (tests/test_reliability.py), loaded by putting this
directory on PYTHONPATH. In a stage process (`python -m stages.<name>`) with CATMERGE_KILL_AT=n,
the n-th rename of a finished temporary file onto its final name (0-based) instead cuts that
temporary to half its size and SIGKILLs the process: the state a kill in the middle of writing it
leaves. Other processes (DVC itself) are untouched."""

import os
import signal
import sys

_argv = getattr(sys, "orig_argv", [])
if os.environ.get("CATMERGE_KILL_AT") and "-m" in _argv and _argv[_argv.index("-m") + 1].startswith("stages."):
    _kill_at = int(os.environ["CATMERGE_KILL_AT"])
    _replace = os.replace
    _count = [0]

    def _replace_or_die(src, dst, *args, **kwargs):
        if _count[0] == _kill_at:
            if os.path.isfile(src):
                os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        _count[0] += 1
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die
