"""Checkpoint files from the hub or from disk, read as tensors; pickles only when allowed.

A reference is a hub repo id (`org/name`), a local directory, or a local file. Within a repo or
directory the first of the safetensors names that exists is read; pickle names (`.bin`, `.pt`) are
used only when no safetensors file exists, and only with `allow_pickle`. Then the file is read
once, here, with torch's restricted `weights_only` loader (plain state dicts). Whole pickled
modules, like the Task Arithmetic authors' `finetuned.pt`, need more: only for open_clip
checkpoints (`modules=True`) they are unpickled with an allowlist of globals (torch, open_clip,
torchvision, numpy, PIL, collections and a few builtins, minus the parts that load, compile or
fetch code; anything else, e.g. `os.system`, is refused), in which the authors' own `src.*`
classes are stand-ins. The allowlist narrows what a hostile file can reach; it is not a sandbox:
only allow pickles you trust. The calling stage writes the
tensors back as safetensors, so nothing downstream ever unpickles.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .hub import HubFile, fetch, has_file, is_local
from .io import ArtifactError, StateDict, load_weights, sha256_file


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
    return HubFile(path.resolve(), str(Path(ref).expanduser()), path.name, "local", digest)


def fetch_file(ref: str, name: str, revision: str = "main") -> HubFile:
    """File `name` of a hub repo or local directory."""
    if not is_local(ref):
        return fetch(ref, name, revision)
    if not Path(ref).expanduser().is_dir():
        raise ArtifactError(f"{ref}: expected a directory holding {name} (a checkpoint with its config and tokenizer files)")
    return _local_file(ref, (name,), None)


def holds(ref: str, name: str, revision: str = "main") -> bool:
    return (Path(ref).expanduser() / name).is_file() if is_local(ref) else has_file(ref, name, revision)


def fetch_checkpoint(ref: str, revision: str, sha256: str | None, allow_pickle: bool,
                     safetensors: tuple[str, ...], pickles: tuple[str, ...], modules: bool = False) -> tuple[StateDict, HubFile]:
    """(tensors, where they came from) of the checkpoint `ref` names; `modules`: a pickle may hold
    a whole module (read with the allowlist above), not only a state dict."""
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
        return read_pickle(found.path, modules), found
    return load_weights(found.path), found


class _StandIn(nn.Module):
    """Any class of the Task Arithmetic code base (`src.modeling.ImageEncoder`, ...): unpickled
    as a plain module whose attributes (e.g. `model`, an open_clip CLIP) come from the pickle."""


ALLOWED_MODULES = ("torch", "open_clip", "torchvision", "numpy", "PIL", "collections", "_codecs", "copyreg", "typing")
# within the allowed packages, what loads, compiles or fetches code
RISKY_MODULES = ("torch.hub", "torch.jit", "torch.package", "torch.utils.cpp_extension", "torch.serialization",
                 "torch._dynamo", "torch.compiler", "torch.fx", "open_clip.factory", "open_clip.pretrained", "numpy.ctypeslib",
                 "numpy.lib.npyio", "typing.get_type_hints")
ALLOWED_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "tuple", "list", "dict", "bytearray", "object",
                    "int", "float", "bool", "str", "bytes"}


class _TaskArithmeticUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "src" or module.startswith("src."):
            return _StandIn
        if module in ("builtins", "__builtin__") and name in ALLOWED_BUILTINS:
            return super().find_class(module, name)
        risky = module.startswith(RISKY_MODULES) or (module == "torch" and name in ("load", "save", "compile"))
        if module.split(".")[0] in ALLOWED_MODULES and not risky:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}: not a model class this reader knows")


class _PickleModule:
    Unpickler = _TaskArithmeticUnpickler
    load = pickle.load
    __name__ = "catmerge_task_arithmetic_pickle"


def read_pickle(path: Path, modules: bool = False) -> StateDict:
    """The tensors of a pickled state dict, or with `modules` of a pickled module (see above)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a plain state dict
        if not modules:
            raise ArtifactError(f"{path}: not a plain tensor state dict, which is all this source reads from a pickle "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        # Reached only with hub.allow_pickle and source open_clip (fetch_checkpoint's `modules`), and
        # every global goes through _TaskArithmeticUnpickler's allowlist (tests/test_hub.py).
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
