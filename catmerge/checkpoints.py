"""Checkpoint files from the hub or from disk, read as tensors; pickles only when allowed.

A reference is a hub repo id (`org/name`), a local directory, or a local file. Within a repo or
directory the first of the safetensors names that exists is read; pickle names (`.bin`, `.pt`) are
used only when no safetensors file exists, and only with `allow_pickle`. Then the file is read
once, here: first with torch's restricted `weights_only` loader (plain state dicts), else (whole
pickled modules, like the Task Arithmetic authors' `finetuned.pt`) with a full unpickle in which
the authors' `src.modeling` classes are stand-ins. The calling stage writes the tensors back as
safetensors, so nothing downstream ever unpickles.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .hub import HubFile, fetch, has_file
from .io import ArtifactError, StateDict, load_weights, sha256_file


def is_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists()


def _local_file(ref: str, names: tuple[str, ...], sha256: str | None) -> HubFile:
    path = Path(ref).expanduser()
    if path.is_dir():
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise ArtifactError(f"{path}: none of {', '.join(names)} in this directory")
        path = found[0]
    elif not path.is_file():
        raise ArtifactError(f"{path}: no such checkpoint file or directory")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256.lower():
        raise ArtifactError(f"{path}: sha256 {digest} does not match the pinned {sha256}")
    return HubFile(path.resolve(), str(path), path.name, "local", digest)


def fetch_file(ref: str, name: str, revision: str = "main") -> HubFile:
    """File `name` of a hub repo or local directory."""
    return _local_file(ref, (name,), None) if is_local(ref) else fetch(ref, name, revision)


def holds(ref: str, name: str, revision: str = "main") -> bool:
    return (Path(ref).expanduser() / name).is_file() if is_local(ref) else has_file(ref, name, revision)


def fetch_checkpoint(ref: str, revision: str, sha256: str | None, allow_pickle: bool,
                     safetensors: tuple[str, ...], pickles: tuple[str, ...]) -> tuple[StateDict, HubFile]:
    """(tensors, where they came from) of the checkpoint `ref` names."""
    if is_local(ref):
        found = _local_file(ref, safetensors + pickles, sha256)
    else:
        present = [n for n in safetensors + pickles if holds(ref, n, revision)]
        name = present[0] if present else safetensors[0]  # fetch names the missing file in its error
        found = fetch(ref, name, revision, sha256)
    if not found.filename.endswith(".safetensors"):
        if not allow_pickle:
            raise ArtifactError(f"{found.repo}: {found.filename} is a pickle, which can run code when loaded, and no safetensors "
                                f"file is there; set `hub.allow_pickle: true` in params.yaml to convert it once to safetensors")
        return read_pickle(found.path), found
    return load_weights(found.path), found


class _StandIn(nn.Module):
    """Any class of the Task Arithmetic code base (`src.modeling.ImageEncoder`, ...): unpickled
    as a plain module whose attributes (e.g. `model`, an open_clip CLIP) come from the pickle."""


class _TaskArithmeticUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "src.modeling" or module.startswith("src."):
            return _StandIn
        return super().find_class(module, name)


class _PickleModule:
    Unpickler = _TaskArithmeticUnpickler
    load = pickle.load
    __name__ = "catmerge_task_arithmetic_pickle"


def read_pickle(path: Path) -> StateDict:
    """The tensors of a pickled state dict or module (see the module docstring)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain state dict: a whole pickled module
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{path}: cannot read this pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a state dict or a module, found {type(obj).__name__}")
    return {k: v.detach().clone() for k, v in obj.items() if isinstance(v, torch.Tensor)}
