"""Files from the Hugging Face hub, through `huggingface_hub` (its cache, resumable downloads).

Every file comes back as a `HubFile` with the commit it resolved to and its sha256, for the stage
manifests. A pinned sha256 that does not match stops with an error naming the repo and file.

Offline (HF_HUB_OFFLINE=1, or no route to the hub: checked once with a 3 s connect) a file is
taken from the cache only, so a missing one fails at once, with the command that pre-fetches it,
instead of after the hub client's retries.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

from .io import ArtifactError, HubUnavailable, sha256_file

HUB_HOST = "huggingface.co"


def head_cache_dir() -> Path:
    """Where zero-shot heads are cached: beside the hub cache (outside the project: the stage
    runner allows writes there)."""
    from huggingface_hub import constants

    return Path(os.environ.get("CATMERGE_HEAD_CACHE", Path(constants.HF_HOME) / "catmerge" / "heads"))


@dataclass(frozen=True)
class HubFile:
    path: Path
    repo: str
    filename: str
    revision: str  # the commit the requested revision resolved to
    sha256: str

    def record(self, kind: str = "model") -> dict[str, str]:
        return {"repo": self.repo, "repo_type": kind, "file": self.filename, "revision": self.revision, "sha256": self.sha256}


def is_local(ref: str) -> bool:
    """A path on disk rather than a hub repo id."""
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists()


@cache
def offline() -> bool:
    """True when the hub must not be asked: HF_HUB_OFFLINE is set, or the hub cannot be reached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return False  # only the proxy knows the route: let the hub client try (and fail with its own error)
    url = urlsplit(os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=3).close()
        return False
    except OSError:
        return True


def _prefetch_hint(repo: str, revision: str, kind: str, pattern: str | None = None) -> str:
    """The command that fills the cache with what a stage reads from `repo` (a whole model repo;
    a dataset's files matching `pattern`)."""
    flags = f" --revision {revision}" + ("" if kind == "model" else f" --repo-type {kind}")
    if pattern is not None:
        flags += f" --include {pattern!r}"
    return (f"pre-fetch it on a machine with network: `hf download {repo}{flags}`, "
            f"then copy its HF_HOME ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) here")


def _commit_of(path: Path) -> str:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "unknown"


def _checked(path: Path, repo: str, filename: str, sha256: str | None) -> HubFile:
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256.lower():
        raise ArtifactError(f"{repo}/{filename}: sha256 {digest} does not match the pinned {sha256} "
                            f"(a different file than the one pinned; check the repo id and revision)")
    return HubFile(Path(path), repo, filename, _commit_of(Path(path)), digest)


@contextlib.contextmanager
def _hub_errors(repo: str, what: str, revision: str, kind: str, local: bool, pattern: str | None = None):
    """Hub client errors -> ours: permanent ones (ArtifactError: no such repo, revision or file;
    not cached while offline) and ones a retry may fix (HubUnavailable: the request failed)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError as exc:
        if not local:  # online, but the request failed (connection, timeout, server): may pass
            raise HubUnavailable(f"{kind} repo {repo}: downloading {what} failed: {exc}") from None
        raise ArtifactError(f"{kind} repo {repo}: {what} (revision {revision}) is not in the hub cache and the hub is "
                            f"offline; {_prefetch_hint(repo, revision, kind, pattern)}") from None
    except EntryNotFoundError:
        raise ArtifactError(f"{kind} repo {repo} (revision {revision}) has no file {what}") from None
    except RevisionNotFoundError:
        raise ArtifactError(f"{kind} repo {repo} has no revision {revision!r} (a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise ArtifactError(f"{kind} repo {repo} not found on the hub (or it is private: log in with `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise HubUnavailable(f"{kind} repo {repo}: downloading {what} failed: {exc}") from None


def fetch(repo: str, filename: str, revision: str = "main", sha256: str | None = None, kind: str = "model") -> HubFile:
    """One file of a hub repo (`kind` model or dataset), downloaded or taken from the cache."""
    from huggingface_hub import hf_hub_download

    local = offline()
    with _hub_errors(repo, filename, revision, kind, local):
        path = hf_hub_download(repo, filename, revision=revision, repo_type=kind, local_files_only=local)
    return _checked(Path(path), repo, filename, sha256)


def has_file(repo: str, filename: str, revision: str = "main", kind: str = "model") -> bool:
    """Whether the repo (in the cache when offline) holds `filename`; False when that cannot be told."""
    from huggingface_hub import file_exists, try_to_load_from_cache

    if offline():
        return isinstance(try_to_load_from_cache(repo, filename, revision=revision, repo_type=kind), str)
    try:
        return file_exists(repo, filename, revision=revision, repo_type=kind)
    except Exception:  # noqa: BLE001 - a lookup failure only means "cannot tell"
        return False


def fetch_matching(repo: str, pattern: str, revision: str = "main", kind: str = "dataset") -> list[HubFile]:
    """Every file of a repo whose path matches the glob `pattern`, sorted by path."""
    from huggingface_hub import snapshot_download

    local = offline()
    with _hub_errors(repo, pattern, revision, kind, local, pattern):
        root = Path(snapshot_download(repo, repo_type=kind, revision=revision, allow_patterns=[pattern], local_files_only=local))
    paths = sorted(p for p in root.rglob("*") if p.is_file() and fnmatch.fnmatch(p.relative_to(root).as_posix(), pattern))
    if not paths:
        raise ArtifactError(f"{kind} repo {repo} (revision {revision}) has no file matching {pattern!r}"
                            + ("" if not local else f" in the hub cache; {_prefetch_hint(repo, revision, kind, pattern)}"))
    return [_checked(p, repo, p.relative_to(root).as_posix(), None) for p in paths]
