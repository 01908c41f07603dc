"""Locations that are either local paths or object-store URIs (``s3://``, ``gs://``), through ``pyarrow.fs``.

A multi-node sweep keeps its manifests, pixel shards, Tune trial folders and Train checkpoints where every
node can read them: a shared file system path or a bucket. This module lets the rest of the package treat
both the same way: resolve a location to a ``pyarrow.fs`` file system and path, join and split locations,
test existence, read, and write small files.

A URI goes to ``pyarrow.fs.FileSystem.from_uri``, the same resolver Ray Train and Tune use for their
``storage_path``, so one string means the same place to mammo_ray and to Ray. Options travel as query
parameters, e.g. an S3-compatible server (MinIO, Ceph, moto):
``s3://bucket/prefix?endpoint_override=http%3A%2F%2Fminio%3A9000&scheme=http``. Joining keeps the query,
so every location derived from such a URI still reaches the same server. Credentials come from the
environment or the node's role (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an instance profile,
``GOOGLE_APPLICATION_CREDENTIALS``, workload identity); :func:`public` drops any ``user:secret@`` part
before a URI is printed or written to a file.
"""

from __future__ import annotations

import functools
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import pyarrow.fs as pafs

from mammo_ray import io

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# Object stores whose pyarrow path is "<bucket>/<key>", so it can be computed without calling from_uri
# (which, for S3 without a region or endpoint, asks AWS for the bucket's region on every call).
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


class StorageError(OSError):
    """A location that cannot be reached or read; the message names it (without credentials)."""


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://…`` strings (a Windows drive letter is one character, so it never matches)."""
    return isinstance(location, str) and bool(_URI.match(location))


def public(location: str | Path) -> str:
    """The location as it may be printed or stored: a URI without its ``user:secret@`` part."""
    if not is_uri(location):
        return str(location)
    parts = urlsplit(str(location))
    if "@" not in parts.netloc:
        return str(location)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def join(location: str | Path, *names: str) -> str | Path:
    """``location / names``: a URI keeps its scheme, bucket and query (endpoint options); ``..`` is folded."""
    if not is_uri(location):
        return Path(location, *names)
    parts = urlsplit(str(location))
    path = posixpath.normpath(posixpath.join(parts.path or "/", *names))
    return urlunsplit(parts._replace(path="" if path == "/" else path))


def parent(location: str | Path) -> str | Path:
    if not is_uri(location):
        return Path(location).parent
    return join(location, "..")


def name(location: str | Path) -> str:
    """The last component of the location's path (a URI's query is not part of it)."""
    if not is_uri(location):
        return Path(location).name
    return posixpath.basename(urlsplit(str(location)).path.rstrip("/"))


def suffix(location: str | Path) -> str:
    return posixpath.splitext(name(location))[1]


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    # One file system per bucket and option set and process: a Ray Data task reads many batches, and building
    # an S3 client each time would redo the credential look-up (and, without a region, a request to AWS).
    uri = urlunsplit((scheme, netloc, "/", query, ""))
    return pafs.FileSystem.from_uri(uri)[0]


@functools.lru_cache(maxsize=1024)
def _other_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` file system and the path on it.

    Raises:
        StorageError: a URI that pyarrow cannot use (unknown scheme or query parameter, no such bucket
            region), naming the URI.
    """
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    uri = str(location)
    parts: SplitResult = urlsplit(uri)
    try:
        if parts.scheme.lower() in _BUCKET_SCHEMES:
            bucket = parts.netloc.rsplit("@", 1)[-1]
            path = f"{bucket}{unquote(parts.path)}".rstrip("/")
            return _filesystem(parts.scheme.lower(), parts.netloc, parts.query), path
        return _other_uri(uri)
    except (OSError, ValueError, TypeError) as err:  # pyarrow raises ArrowInvalid (a ValueError) for bad options
        raise StorageError(f"{public(uri)}: cannot use this location ({err})") from err


def file_type(location: str | Path) -> pafs.FileType:
    """``File``, ``Directory`` or ``NotFound``.

    Raises:
        StorageError: the location cannot be reached (network, credentials), naming it.
    """
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path).type
    except OSError as err:
        raise StorageError(f"{public(location)}: cannot reach it ({err})") from err


def exists(location: str | Path) -> bool:
    return file_type(location) != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    return file_type(location) == pafs.FileType.File


def missing(locations: Iterable[str | Path]) -> list[str]:
    """The locations that do not exist, in the order given (for a URI: that are not objects).

    Local paths are tested one by one; URIs are listed per folder (one listing request for all the shards
    of a cache folder instead of one request per file).

    Raises:
        StorageError: a folder cannot be listed (network, credentials), naming it.
    """
    locations = [str(location) for location in locations]
    by_folder: dict[str, list[str]] = {}
    for location in locations:
        if is_uri(location):
            by_folder.setdefault(str(parent(location)), []).append(location)
    present: set[str] = set()
    for folder, members in by_folder.items():
        fs, folder_path = resolve(folder)
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder_path, allow_not_found=True))
        except OSError as err:
            raise StorageError(f"{public(folder)}: cannot list it ({err})") from err
        files = {info.path for info in infos if info.type == pafs.FileType.File}
        present.update(member for member in members if resolve(member)[1] in files)
    return [loc for loc in locations if (loc not in present if is_uri(loc) else not Path(loc).exists())]


def open_input_file(location: str | Path):
    """A random-access reader (``read_at(nbytes, offset)``, ``read()``); the caller closes it.

    Raises:
        StorageError: naming the location.
    """
    fs, path = resolve(location)
    try:
        return fs.open_input_file(path)
    except (OSError, FileNotFoundError) as err:
        raise StorageError(f"{public(location)}: cannot open it ({err})") from err


def read_bytes(location: str | Path) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    with open_input_file(location) as handle:
        try:
            return handle.read()
        except OSError as err:
            raise StorageError(f"{public(location)}: cannot read it ({err})") from err


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write one file so that no reader sees half of it.

    Local paths go through :func:`io.atomic_write_bytes` (temporary sibling and rename). On S3 and GCS an
    object appears only when its upload completes, so one upload of the whole payload is atomic already.
    """
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        io.atomic_write_bytes(path, data)
        return
    try:
        # The payload is complete before the stream opens, so a failure cannot leave a partial object.
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as err:
        raise StorageError(f"{public(location)}: cannot write it ({err})") from err


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode())


def download(folder: str | Path, names: Iterable[str], dest: Path) -> Path:
    """Copy the files ``names`` of ``folder`` into the local folder ``dest`` (created); return ``dest``.

    Raises:
        StorageError: a file is missing or cannot be read, naming it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for file_name in names:
        source = join(folder, file_name)
        fs, path = resolve(source)
        try:
            pafs.copy_files(path, str((dest / file_name).resolve()), source_filesystem=fs)
        except (OSError, FileNotFoundError) as err:
            raise StorageError(f"{public(source)}: cannot download it ({err})") from err
    return dest


def delete_dir(location: str | Path) -> None:
    """Delete a folder and everything in it (a sweep's own outputs, for ``--overwrite``)."""
    fs, path = resolve(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(f"{public(location)}: cannot delete it ({err})") from err


def check_reachable(location: str | Path) -> None:
    """Fail fast, before Ray starts, on a location that cannot be used: a bad URI, no such bucket, no access.

    For an object store the bucket must exist (Ray's checkpoint upload would not create it); the prefix
    under it need not. The probe looks up the bucket itself. On GCS that reads the bucket's metadata, which
    needs ``storage.buckets.get``. Ray Train needs the same permission: its ``create_dir`` of the experiment
    folder reads the bucket's metadata when no folder marker exists above it yet (Arrow's GCS file system). So
    a listing, which needs only object permissions, would pass here and fail in Ray after start-up.

    Raises:
        StorageError: naming the location and the reason.
    """
    if not is_uri(location):
        return
    fs, path = resolve(location)
    bucket = path.split("/", 1)[0]
    scheme = urlsplit(str(location)).scheme.lower()
    probe = bucket if scheme in _BUCKET_SCHEMES else path
    try:
        kind = fs.get_file_info(probe).type
    except OSError as err:
        hint = ""
        if scheme in ("gs", "gcs"):
            hint = (
                f"; on GCS the credentials need storage.buckets.get on bucket {bucket!r} besides object access"
                " (roles/storage.objectAdmin lacks it; add e.g. roles/storage.legacyBucketReader on the bucket)"
            )
        raise StorageError(f"{public(location)}: cannot reach it ({err}){hint}") from err
    if scheme in _BUCKET_SCHEMES and kind == pafs.FileType.NotFound:
        raise StorageError(f"{public(location)}: bucket {bucket!r} does not exist (create it first)")
