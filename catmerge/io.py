"""Reading and writing artifacts: safetensors weights, JSON metadata, atomic writes, hashes.

Every writer here goes through a temporary file in the destination directory and an
`os.replace`, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where weights are touched: the datasets stage never needs it
    import torch

StateDict = dict[str, "torch.Tensor"]
METADATA_KEY = "catmerge"


class ArtifactError(RuntimeError):
    """An input artifact is missing, unreadable or inconsistent; the message names the file."""


class HubUnavailable(ArtifactError):
    """A download failed in a way that may pass (network, server): worth a retry, unlike the rest."""


# Where writes may go, when a caller (the pipeline's stage runner) confines them: the project, and
# caches it names. None: anywhere (the library used from a notebook).
_WRITE_ROOTS: tuple[Path, ...] | None = None
TEMP_DIR = Path(".catmerge/tmp")  # under the first root: outside every DVC-tracked output directory


@contextlib.contextmanager
def confined_writes(project: str | Path, *also: str | Path) -> Iterator[None]:
    """Every write of this module (atomic_path, atomic_dir and all writers built on them) must land
    inside `project` or one of `also`, judged on the path as written with `..` collapsed (symlinks
    the user made inside the project are trusted); temporaries go to `<project>/.catmerge/tmp`,
    where a DVC checkout of a tracked directory cannot delete them mid-write."""
    global _WRITE_ROOTS
    before = _WRITE_ROOTS
    _WRITE_ROOTS = tuple(Path(os.path.abspath(r)) for r in (project, *also))
    remove_orphaned_temps(_WRITE_ROOTS[0] / TEMP_DIR)
    try:
        yield
    finally:
        _WRITE_ROOTS = before


def check_write_target(path: str | Path) -> Path:
    """`path`, once it is known to lie inside the confined roots (when writes are confined)."""
    path = Path(path)
    if _WRITE_ROOTS is not None:
        absolute = Path(os.path.abspath(path))
        if not any(absolute == root or absolute.is_relative_to(root) for root in _WRITE_ROOTS):
            raise ArtifactError(f"refusing to write {path}: it resolves to {absolute}, outside the project "
                                f"{_WRITE_ROOTS[0]}" + (f" and {', '.join(map(str, _WRITE_ROOTS[1:]))}" if _WRITE_ROOTS[1:] else ""))
    return path


def _temp_dir(path: Path) -> Path:
    """Where the temporary of `path` is made: the project's temp directory when writes are
    confined and it lies on the same filesystem (a rename cannot cross filesystems), else beside it."""
    if _WRITE_ROOTS is not None:
        temp = _WRITE_ROOTS[0] / TEMP_DIR
        try:
            temp.mkdir(parents=True, exist_ok=True)
            if temp.stat().st_dev == path.parent.stat().st_dev:
                return temp
        except OSError:
            pass
    return path.parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    # the writer's pid in the name tells a later writer whether the temp is an orphan
    return f".{path.name}.{os.getpid()}."


def _remove_orphans(path: Path, temp_dir: Path) -> None:
    remove_orphaned_temps(path.parent, path.name)
    if temp_dir != path.parent:
        remove_orphaned_temps(temp_dir, path.name)


def remove_orphaned_temps(directory: str | Path, target: str | None = None) -> None:
    """Delete the temporaries that writers killed mid-write (SIGKILL skips their cleanup) left in
    `directory` (only those of `target`, when given): those whose writer process is gone. A live
    writer's temporary is never touched. Temp names: `.<target>.<pid>.<random>.tmp`."""
    if not Path(directory).is_dir():
        return
    for orphan in Path(directory).glob(f".{glob.escape(target) if target else ''}*.tmp"):
        parts = orphan.name[1 : -len(".tmp")].rsplit(".", 2)
        if len(parts) != 3:
            continue
        name, pid, _ = parts
        if (target is None or name == target) and pid.isdigit() and len(pid) < 10 and not _alive(int(pid)):
            if orphan.is_dir() and not orphan.is_symlink():
                shutil.rmtree(orphan, ignore_errors=True)
            else:
                orphan.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (beside `path`, or in the project's temp directory); on success it is
    renamed onto `path`."""
    path = check_write_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = _temp_dir(path)
    _remove_orphans(path, temp_dir)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=temp_dir)
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
    """Yield a temporary directory (beside `path`, or in the project's temp directory); on success it
    replaces `path` whole."""
    path = check_write_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = _temp_dir(path)
    _remove_orphans(path, temp_dir)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=temp_dir))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists():
            old = temp_dir / f"{_temp_prefix(path)}old.tmp"  # a temporary too: a kill here leaves an orphan
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# safetensors' dtype names, in the order its writer lays tensors out (larger alignment first, then
# by name). `weights_writer` follows the same layout, so its files are byte-identical to save_file's.
_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
_TORCH_DTYPES = {
    "U64": "uint64", "I64": "int64", "F64": "float64", "F32": "float32", "U32": "uint32", "I32": "int32",
    "BF16": "bfloat16", "F16": "float16", "U16": "uint16", "I16": "int16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip

Spec = tuple["torch.dtype", tuple[int, ...]]


def _safetensors_dtype(dtype: torch.dtype) -> str:
    import torch

    for name, torch_name in _TORCH_DTYPES.items():
        if getattr(torch, torch_name, None) == dtype:
            return name
    raise ArtifactError(f"dtype {dtype} cannot be stored in safetensors")


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


def _layout(specs: dict[str, Spec], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """(header bytes, data offset by tensor name) of a safetensors file holding `specs`."""
    import torch

    order = sorted(specs, key=lambda k: (_DTYPE_ORDER.index(_safetensors_dtype(specs[k][0])), k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offsets, position = {}, 0
    for name in order:
        dtype, shape = specs[name]
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _safetensors_dtype(dtype), "shape": list(shape), "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


@contextlib.contextmanager
def weights_writer(path: str | Path, specs: dict[str, Spec], metadata: dict[str, str] | None = None):
    """Write a safetensors file one tensor at a time, in any order: yields `write(name, tensor)`.
    The file appears under `path` only once every tensor of `specs` (name -> (dtype, shape)) is in.

    safetensors' own save_file first copies every tensor to bytes (twice the model in memory);
    this holds none of it, and lays the file out as save_file does (same bytes)."""
    specs = {name: (dtype, tuple(shape)) for name, (dtype, shape) in specs.items()}
    header, offsets = _layout(specs, {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None)
    written: set[str] = set()

    def write(name: str, tensor: torch.Tensor) -> None:
        if name not in specs:
            raise ArtifactError(f"{path}: {name} is not among the tensors planned for this file")
        if name in written:
            raise ArtifactError(f"{path}: {name} written twice")
        if (tensor.dtype, tuple(tensor.shape)) != specs[name]:
            raise ArtifactError(f"{path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {specs[name][1]} {specs[name][0]}")
        import torch

        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        handle.seek(len(header) + offsets[name])
        handle.write(memoryview(data))
        written.add(name)

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(header)
        yield write
        missing = sorted(set(specs) - written)
        if missing:
            raise ArtifactError(f"{path}: not written: {missing[:5]}")


def save_weights(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically, one tensor at a time (`tensors` may compute each on access:
    a `LazyWeights`). Metadata goes under one key as sorted JSON, because safetensors writes a
    multi-key metadata map in no fixed order (the bytes would vary)."""
    with weights_writer(path, specs_of(tensors), metadata) as write:
        for name in tensors:
            write(name, tensors[name])


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, Spec]:
    """name -> (dtype, shape), without computing or reading a lazy mapping's tensors."""
    if isinstance(tensors, (WeightsFile, LazyWeights)):
        return dict(tensors.specs)
    return {name: (value.dtype, tuple(value.shape)) for name, value in tensors.items()}


# A header larger than this is refused as corrupt (safetensors' own reader has the same limit).
MAX_HEADER_BYTES = 100_000_000


def read_header(path: str | Path) -> tuple[dict[str, Spec], dict[str, tuple[int, int]], dict[str, str], int]:
    """(specs, byte range of each tensor's data, the file's metadata map, where the data starts) of
    a safetensors file, from its header alone; anything malformed is an ArtifactError naming it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing weights file: {path}")

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"cannot read safetensors file {path}: {problem}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, too short for a safetensors header (an empty or truncated file)")
            length = int.from_bytes(prefix, "little")
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"the header claims {length} bytes, the file has {size - 8} after its length prefix")
            header = json.loads(fh.read(length))
    except OSError as exc:
        raise bad(exc.strerror or str(exc)) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not a map of strings")
    start, data_size = 8 + length, size - 8 - length
    specs: dict[str, Spec] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        try:
            dtype = _torch_dtype(entry["dtype"])
            shape = tuple(int(n) for n in entry["shape"])
            begin, stop = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad(f"tensor {name!r} has a malformed entry {entry!r}") from exc
        expected = torch.Size(shape).numel() * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= stop <= data_size or stop - begin != expected:
            raise bad(f"tensor {name!r} ({entry['dtype']} {list(shape)}) does not fit its byte range "
                      f"[{begin}, {stop}) in {data_size} bytes of data")
        specs[name], ranges[name] = (dtype, shape), (begin, stop)
    return specs, ranges, metadata, start


class WeightsFile(Mapping):
    """A safetensors file read one tensor per access. The header is parsed once, here; each read
    takes that tensor's bytes and nothing else.

    A file held open by safe_open is memory-mapped, and every page read stays resident and counts
    toward the process's RSS until it is closed: reading K task vectors that way costs K models.
    Here only the tensors the caller keeps stay in memory; and safe_open would parse the header
    again for every tensor (minutes for a large model's many tensors)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.specs, self._ranges, header, self._start = read_header(self.path)
        try:
            self.metadata = json.loads(header.get(METADATA_KEY, "{}"))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{self.path}: its {METADATA_KEY!r} metadata is not JSON ({exc})") from exc
        if not isinstance(self.metadata, dict):
            raise ArtifactError(f"{self.path}: its {METADATA_KEY!r} metadata is not a JSON object")

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self.specs

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch

        if name not in self.specs:
            raise KeyError(name)
        dtype, shape = self.specs[name]
        begin, stop = self._ranges[name]
        if begin == stop:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(stop - begin)
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._start + begin)
                got = fh.readinto(buffer)
        except OSError as exc:
            raise ArtifactError(f"cannot read {name} from {self.path}: {exc.strerror or exc}") from exc
        if got != len(buffer):
            raise ArtifactError(f"cannot read {name} from {self.path}: the file ends early (changed while being read?)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def check_claims(self, **claims: object) -> None:
        """Each `key=value` is what this file's metadata must say (a task vector copied over
        another task's file still says its own task)."""
        for key, expected in claims.items():
            if self.metadata.get(key) != expected:
                raise ArtifactError(f"{self.path}: its metadata says {key} {self.metadata.get(key)!r}, expected {expected!r}")

    def check_dtypes(self, dtype: torch.dtype, what: str) -> None:
        """Every tensor is of `dtype` (what the writer recorded, `what` says where that comes from)."""
        wrong = [(k, d) for k, (d, _) in self.specs.items() if d != dtype]
        if wrong:
            raise ArtifactError(f"{self.path}: {wrong[0][0]} is {wrong[0][1]}, but {what} says {dtype} "
                                f"({len(wrong)} tensor(s) differ; rewritten after its stage wrote it?)")


class LazyWeights(Mapping):
    """Tensors computed on access by `compute(name)` (never kept), with their specs known up front:
    a merged model can be written tensor by tensor without ever being whole in memory."""

    def __init__(self, specs: dict[str, Spec], compute):
        self.specs = specs
        self._compute = compute

    def __contains__(self, name: object) -> bool:  # Mapping's default would compute the tensor
        return name in self.specs

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._compute(name)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def read_metadata(path: str | Path) -> dict:
    """The catmerge metadata of a safetensors file (read from its header only)."""
    return WeightsFile(path).metadata


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
    weights = WeightsFile(path)
    return weights.get(key, default)


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing JSON file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # UnicodeDecodeError: not even text
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


# Files this process has hashed and found as their manifest says, by identity and modification
# time: each stage reads theta_0 several times, and hashing it once is enough.
_VERIFIED: set[tuple] = set()


def verify_manifest(directory: str | Path, manifest_name: str = "manifest.json", only: Collection[str] | None = None) -> dict:
    """The manifest of an artifact directory, after checking the files it lists (those in `only`,
    when given): the path stays inside the directory, the file exists and its sha256 is the one
    recorded. A file changed or swapped after its stage wrote it stops the reader here, naming it."""
    directory = Path(directory)
    only = None if only is None else set(only)
    if not directory.is_dir():
        raise ArtifactError(f"missing directory: {directory}")
    manifest_path = directory / manifest_name
    manifest = read_json(manifest_path)
    records = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("path"), str) and re.fullmatch(r"[0-9a-f]{64}", str(r.get("sha256"))) for r in records
    ):
        raise ArtifactError(f"{manifest_path}: expected a key 'files' listing records with a 'path' and a 64-hex-digit 'sha256'")
    for record in records:
        relative = PurePosixPath(record["path"])
        # judged as written, not as resolved: DVC may check files out as symlinks into its cache
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ArtifactError(f"{manifest_path}: path {record['path']!r} points outside {directory}")
        if only is not None and record["path"] not in only:
            continue
        target = directory / relative
        if not target.is_file():
            raise ArtifactError(f"{manifest_path}: lists {record['path']}, which is missing from {directory}")
        stat = target.stat()
        seen = (str(target.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, record["sha256"])
        if seen in _VERIFIED:
            continue
        digest = sha256_file(target)
        if digest != record["sha256"]:
            raise ArtifactError(f"{target}: sha256 {digest} does not match {record['sha256']} "
                                f"recorded in {manifest_path} (changed after its stage wrote it)")
        _VERIFIED.add(seen)
    missing = sorted(set(only or ()) - {r["path"] for r in records})
    if missing:
        raise ArtifactError(f"{manifest_path}: does not list {', '.join(missing)}")
    return manifest


def sidecar_manifest(path: str | Path) -> Path:
    """The manifest beside a single-file artifact: `<name>.safetensors` -> `<name>.manifest.json`."""
    path = Path(path)
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.manifest.json")


def write_sidecar_manifest(path: str | Path, source: str, **record: Any) -> None:
    """Record a single-file artifact's sha256 (and `record`) beside it, for the stages that read it."""
    path = Path(path)
    write_json({**record, "files": [file_record(path, path.parent, source)]}, sidecar_manifest(path))


def verify_sidecar(path: str | Path) -> dict:
    """The sidecar manifest of `path`, once it vouches for the file's bytes."""
    path = Path(path)
    return verify_manifest(path.parent, sidecar_manifest(path).name, only=[path.name])
