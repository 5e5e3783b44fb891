"""Where each stage's artifacts live (relative to the project root; see docs/artifacts.md)."""

from pathlib import Path

from .io import ArtifactError, read_json, verify_manifest, verify_sidecar

DATA = Path("data")
PRETRAINED_DIR = DATA / "pretrained"
PRETRAINED_TOWER = PRETRAINED_DIR / "image_tower.safetensors"
PRETRAINED_TEXT = PRETRAINED_DIR / "text_projection.safetensors"
MERGED_DIR = DATA / "merged"
METRICS_DIR = Path("metrics")


def checked_pretrained(name: str = PRETRAINED_TOWER.name, root: Path = Path(".")) -> Path:
    """data/pretrained/<name> (the image tower by default), once the directory's manifest vouches for it."""
    verify_manifest(root / PRETRAINED_DIR, only=[name])
    return root / PRETRAINED_DIR / name


def checked_expert(task: str, name: str = "expert.safetensors", root: Path = Path(".")) -> Path:
    """data/experts/<task>/<name> (the tower by default, or head.safetensors), once the
    directory's manifest vouches for it."""
    verify_manifest(root / expert_dir(task), only=[name])
    return root / expert_dir(task) / name


def checked_split(task: str, split: str, root: Path = Path(".")) -> Path:
    """data/datasets/<task>/<split>.parquet, once the dataset's manifest vouches for it."""
    verify_manifest(root / dataset_dir(task), only=[f"{split}.parquet"])
    return root / dataset_dir(task) / f"{split}.parquet"


def checked_dataset_info(task: str, root: Path = Path(".")) -> dict:
    """data/datasets/<task>/info.json, vouched for by the manifest and saying it is `task`'s."""
    verify_manifest(root / dataset_dir(task), only=["info.json"])
    info = read_json(root / dataset_dir(task) / "info.json")
    if not isinstance(info, dict) or info.get("task") != task or not isinstance(info.get("class_names"), list):
        raise ArtifactError(f"{root / dataset_dir(task) / 'info.json'}: expected task {task!r} and a list of class_names, "
                            f"got task {info.get('task') if isinstance(info, dict) else info!r}")
    return info


def checked_task_vector(task: str, root: Path = Path(".")) -> Path:
    """data/task_vectors/<task>.safetensors, once its header and manifest say it is `task`'s (in
    the dtype they record) and its manifest vouches for its bytes: cheap checks first."""
    check_task_vector_header(task, root)
    verify_sidecar(root / task_vector_path(task))
    return root / task_vector_path(task)


def checked_features(task: str, root: Path = Path(".")) -> Path:
    """data/features/<task>.safetensors, once its header and manifest say it is `task`'s and its
    manifest vouches for its bytes: cheap checks first."""
    check_features_header(task, root)
    verify_sidecar(root / features_path(task))
    return root / features_path(task)


def check_task_vector_header(task: str, root: Path = Path(".")) -> None:
    """The cheap checks of data/task_vectors/<task>.safetensors, from its safetensors header and
    its manifest (no tensor data read, nothing hashed): both say `task`, and every tensor is of the
    dtype its metadata records, which the manifest records too."""
    from .io import WeightsFile
    from .task_vectors import check_own_claims

    path = root / task_vector_path(task)
    if _seen(path):
        return
    weights = WeightsFile(path)
    check_own_claims(weights, task)
    _check_manifest_claims(path, task=task, dtype=weights.metadata.get("dtype"))
    _HEADERS_CHECKED.add(_identity(path))


def check_features_header(task: str, root: Path = Path(".")) -> None:
    """The cheap checks of data/features/<task>.safetensors: its header and its manifest say `task`."""
    from .io import WeightsFile

    path = root / features_path(task)
    if _seen(path):
        return
    WeightsFile(path).check_claims(task=task)
    _check_manifest_claims(path, task=task)
    _HEADERS_CHECKED.add(_identity(path))


def check_headers(tasks: list[str], root: Path = Path("."), features: bool = True) -> None:
    """The cheap checks of every task's task vector (and features file), before any is hashed: a
    file of another task or dtype is named at once, not after minutes of hashing the others."""
    for task in tasks:
        check_task_vector_header(task, root)
    for task in tasks if features else ():
        check_features_header(task, root)


# Files whose header (and manifest) this process has checked, by identity and modification time
# of both: the header of a large model takes a while to parse, and the stages check before use.
_HEADERS_CHECKED: set[tuple] = set()


def _identity(path: Path) -> tuple:
    from .io import sidecar_manifest

    out: tuple = (str(path.resolve()),)
    for file in (path, sidecar_manifest(path)):
        stat = file.stat()
        out += (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
    return out


def _seen(path: Path) -> bool:
    try:
        return _identity(path) in _HEADERS_CHECKED
    except OSError:  # missing: the checks name it
        return False


def _check_manifest_claims(path: Path, task: str, **claims: object) -> None:
    """The manifest beside a per-task file says `task` (and each of `claims` it records): one
    copied over from another task's file is named before anything is hashed."""
    from .io import sidecar_manifest

    manifest_path = sidecar_manifest(path)
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object with 'task' and 'files'")
    if manifest.get("task") != task:
        raise ArtifactError(f"{manifest_path}: says task {manifest.get('task')!r}, expected {task!r}")
    for key, expected in claims.items():
        if key in manifest and manifest[key] != expected:
            raise ArtifactError(f"{manifest_path}: records {key} {manifest[key]!r}, but {path} says {expected!r}")


def checked_merged(method: str, root: Path = Path(".")) -> Path:
    """data/merged/<method>.safetensors, once data/merged/manifest.json vouches for it."""
    verify_manifest(root / MERGED_DIR, only=[merged_path(method).name])
    return root / merged_path(method)


def dataset_dir(task: str) -> Path:
    return DATA / "datasets" / task


def expert_dir(task: str) -> Path:
    return DATA / "experts" / task


def task_vector_path(task: str) -> Path:
    return DATA / "task_vectors" / f"{task}.safetensors"


def merged_path(method: str) -> Path:
    return MERGED_DIR / f"{method}.safetensors"


def features_path(task: str) -> Path:
    return DATA / "features" / f"{task}.safetensors"


BASES_DIR = DATA / "bases"
SELECT_CACHE = DATA / "select_cache"
SELECTION = METRICS_DIR / "selection.json"
ALPHA_CURVES = METRICS_DIR / "alpha_curves"
DECOMPOSITION = METRICS_DIR / "decomposition.json"
DECOMPOSITION_CAT = METRICS_DIR / "decomposition_cat.json"  # the same split for CAT's trimmed vectors
REPORTS_DIR = Path("reports")
