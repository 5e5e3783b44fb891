"""Reading and writing artifacts: safetensors weights, JSON metadata, atomic writes, hashes.

Every writer here goes through a temporary file in the destination directory and an
`os.replace`, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where weights are touched: the datasets stage never needs it
    import torch

StateDict = dict[str, "torch.Tensor"]
METADATA_KEY = "catmerge"


class ArtifactError(RuntimeError):
    """An input artifact is missing, unreadable or inconsistent; the message names the file."""


class HubUnavailable(ArtifactError):
    """A download failed in a way that may pass (network, server): worth a retry, unlike the rest."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_weights(tensors: StateDict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically. Metadata goes under one key as sorted JSON, because
    safetensors writes a multi-key metadata map in no fixed order (the bytes would vary)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
    return json.loads(header.get(METADATA_KEY, "{}"))


def load_weights(path: str | Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read safetensors file {path}: {exc}") from exc


def load_tensor(path: str | Path, key: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
    """One tensor of a safetensors file, read without loading the others (`default` if absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(key) if key in fh.keys() else default  # noqa: SIM118 - safe_open has no __contains__


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing JSON file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"invalid JSON in {path}: {exc}") from exc


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path, root: str | Path, source: str) -> dict[str, str]:
    """Manifest entry for one file: path relative to the artifact root, its origin and sha256."""
    path = Path(path)
    return {"path": str(path.relative_to(root)), "source": source, "sha256": sha256_file(path)}
