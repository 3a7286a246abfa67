"""Which code and which settings produced a results row.

* :func:`code_provenance`: the package version and, when the package runs from a git checkout,
  the commit (``git rev-parse HEAD`` in the package's folder) and whether tracked files have
  uncommitted changes. Outside a checkout (an installed wheel, a copy without ``.git``) or without
  git, the revision is ``"unknown"`` and the dirty flag None. Git runs once per process.
* :func:`settings_hash`: the first 16 hex digits of the sha256 of a settings object's canonical
  JSON (sorted keys, no spaces), so equal settings give equal hashes in any process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

UNKNOWN_REVISION = "unknown"


def _git(folder: Path, *args: str) -> str | None:
    """stdout of ``git args`` run in ``folder``; None when git is missing or the command fails."""
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@functools.cache
def source_revision() -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout the package runs from, or (``"unknown"``, None).

    The package counts as running from a checkout only when its own ``__init__.py`` is tracked
    there, so a virtual environment inside some other repository is not mistaken for one.
    """
    folder = Path(__file__).resolve().parent
    if _git(folder, "ls-files", "--error-unmatch", "__init__.py") is None:
        return UNKNOWN_REVISION, None
    head = _git(folder, "rev-parse", "HEAD")
    if head is None:
        return UNKNOWN_REVISION, None
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return head.strip(), None if status is None else bool(status.strip())


def code_provenance() -> dict[str, Any]:
    """``segcompress_version``, ``source_revision`` and ``source_dirty`` columns of a row."""
    from segcompress import __version__

    revision, dirty = source_revision()
    return {"segcompress_version": __version__, "source_revision": revision, "source_dirty": dirty}


def canonical_json(obj: Any) -> str:
    """One spelling of ``obj`` as JSON: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def settings_hash(settings: Any) -> str:
    """First 16 hex digits of the sha256 of ``settings``' canonical JSON."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
