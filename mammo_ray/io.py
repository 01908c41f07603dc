"""Atomic file output: write to a temporary sibling, then rename, so no reader sees half a file; and the size and
SHA-256 records that let a reader tell a complete set of files from one cut short (bundles, checkpoints)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` in one rename.

    The temporary file lives in the destination folder so that the rename stays on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        # mkstemp creates 0600 files; give the output the permissions an ordinary open() would.
        os.chmod(tmp_path, _as_created(0o666))
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def staging_dir(parent: str | Path, prefix: str) -> Path:
    """A new hidden folder in ``parent`` to build an output in before it is renamed into place.

    ``mkdtemp`` creates it 0700, which the rename would carry to the output: colleagues on shared storage could not
    read an exported bundle. It gets the permissions an ordinary ``mkdir`` would.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(_as_created(0o777))
    return folder


def _as_created(mode: int) -> int:
    """``mode`` less the process umask: what ``open`` (0o666) or ``mkdir`` (0o777) would give."""
    umask = os.umask(0)  # read it: setting and restoring is the only portable way
    os.umask(umask)
    return mode & ~umask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_csv(path: str | Path, frame: Any) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def atomic_write_parquet(path: str | Path, frame: Any) -> Path:
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def file_record(path: str | Path, *, digest: bool = True) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file (``sha256`` left out without ``digest``)."""
    path = Path(path)
    record: dict[str, Any] = {"size": path.stat().st_size}
    if digest:
        with path.open("rb") as handle:
            record["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
    return record


def record_mismatch(path: str | Path, expected: dict[str, Any]) -> str | None:
    """How the file at ``path`` differs from its :func:`file_record` ``expected``, in words; None when it matches
    (the SHA-256 is compared only where ``expected`` has one)."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"has {size} bytes where {expected.get('size')} were written"
    if "sha256" in expected and file_record(path)["sha256"] != expected["sha256"]:
        return "differs from what was written (its SHA-256 does not match)"
    return None


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return None if not np.isfinite(obj) else float(obj)
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
