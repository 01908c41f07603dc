"""Manifests: one Parquet row per image, validated before any Ray resource is taken.

Columns (DESIGN.md "Manifests"): ``image_id, path, label, patient_id, exam_id, laterality, view,
dataset, split``, optional ``age, density, manufacturer, birads``. Manifests written by ``prepare``
also carry the pixel-cache location (``cache_file, cache_offset, cache_nbytes``) and the
preprocessing provenance (``prep_*``). Relative paths are relative to the manifest's own folder,
so a prepared folder can move between machines or onto shared storage as one piece.

A manifest may itself live on an object store (``s3://bucket/prepared/train.parquet``, see
``mammo_ray.storage``): its relative ``cache_file`` and ``path`` values then resolve to URIs next to it,
with the same query options (e.g. an S3-compatible endpoint), and the file checks list the bucket.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from mammo_ray import storage

REQUIRED = ("image_id", "path", "label", "patient_id", "exam_id", "laterality", "view", "dataset")
OPTIONAL = ("split", "age", "density", "manufacturer", "birads")
CACHE_COLUMNS = ("cache_file", "cache_offset", "cache_nbytes")
# Columns that travel through the Ray Data pipeline into the workers (pixels are added there).
STREAM_COLUMNS = ("image_id", "path", "label", "patient_id", "exam_id", "laterality", "view", "dataset")
SPLITS = ("train", "valid", "test")
_REMOTE = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://", "http://", "https://")
# One numbering for every error that names a row of a user's table (manifests, importer inputs, predict's input):
# data rows counted from 1, the header not counted. A CSV's row N is then line N + 1 of the file (a quoted value that
# spans lines shifts later lines), and a Parquet file's row N is its N-th row, as a data frame viewer shows it.
ROW_COUNTING = "rows numbered from 1, header not counted"
# read_manifest: each row's 0-based position in its file, kept through the split filter for validate_manifest's
# messages; load_manifests drops it after validation.
FILE_POSITION = "_file_position"


class ManifestError(ValueError):
    """A manifest that cannot be trained on; the message names the file, the rows or the patients."""


def _examples(values, limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"{shown}{more}"


def row_number(position: int) -> int:
    """The number :data:`ROW_COUNTING` gives a table's 0-based data position."""
    return int(position) + 1


def row_label(position: int) -> str:
    """``"row N"`` for a table's 0-based data position (:func:`row_number`).

    Every error that names a row of a user's table goes through here, and says :data:`ROW_COUNTING` once.
    """
    return f"row {row_number(position)}"


def is_remote(path: str) -> bool:
    return str(path).startswith(_REMOTE)


def _resolve(base: str | Path, value: object) -> object:
    if not isinstance(value, str) or not value or is_remote(value) or Path(value).is_absolute():
        return value
    if storage.is_uri(base):
        return storage.join(base, value)
    return str((Path(base) / value).resolve())


def read_manifest(path: str | Path, role: str | None = None, required: tuple[str, ...] = REQUIRED) -> pd.DataFrame:
    """Read a manifest (Parquet, or CSV with the same columns) and resolve its relative paths.

    Args:
        path: the manifest file: a local path or a URI (``s3://…``, ``gs://…``).
        role: ``train``/``valid``/``test``; fills ``split`` when the file has none and keeps only
            that split's rows when the file holds several.
        required: the columns the file must have (``predict`` needs only ``image_id`` and ``path``; the other
            id columns it lacks are filled with empty text).

    Returns:
        The rows, with a fresh index, plus :data:`FILE_POSITION` (each row's position in the file, which the split
        filter changes) for :func:`validate_manifest` to name rows by.

    Raises:
        ManifestError: unreadable file or missing columns, naming them.
    """
    remote = storage.is_uri(str(path))
    path = str(path) if remote else Path(path)
    shown = storage.public(path)
    try:
        found = storage.is_file(path) if remote else path.is_file()
    except storage.StorageError as err:
        raise ManifestError(f"manifest {err}") from err
    if not found:
        raise ManifestError(f"manifest {shown} does not exist")
    try:
        source = storage.read_bytes(path) if remote else path
        if storage.suffix(path).lower() == ".csv":
            # Ids are text: read as numbers, "007" would become 7 and slip past the overlap check.
            text = ("image_id", "patient_id", "exam_id", "laterality", "view", "dataset", "path", "split")
            frame = pd.read_csv(_buffer(source), dtype={c: str for c in text})
        else:
            frame = pd.read_parquet(_buffer(source))
    except Exception as err:  # pyarrow and pandas raise many types for a bad file
        raise ManifestError(f"manifest {shown}: cannot read it ({type(err).__name__}: {err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ManifestError(
            f"manifest {shown}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}"
        )
    frame[FILE_POSITION] = np.arange(len(frame), dtype="int64")
    if role is not None:
        if "split" not in frame.columns:
            frame["split"] = role
        elif frame["split"].nunique() > 1:
            frame = frame[frame["split"] == role]
            if frame.empty:
                raise ManifestError(f"manifest {shown}: no rows with split == {role!r}")
    base = storage.parent(path) if remote else path.parent.resolve()
    frame = frame.reset_index(drop=True).copy()
    for column in ("path", "cache_file"):
        if column in frame.columns:
            frame[column] = [_resolve(base, v) for v in frame[column]]
    for column in ("image_id", "patient_id", "exam_id"):
        # 102 in one file and 102.0 in another (a float column) are one patient: the leak check compares text.
        frame[column] = norm_id(frame[column]).fillna("").astype(str) if column in frame.columns else ""
    for column in ("laterality", "view", "dataset"):
        frame[column] = frame[column].fillna("").astype(str) if column in frame.columns else ""
    if "label" in frame.columns:
        labels = pd.to_numeric(frame["label"], errors="coerce")
        # Text "0"/"1" or floats become int 0/1 for every consumer (sums, the samplers' label == 1). Anything else is
        # left as written, for validate_manifest to name (predict reads a blank label as unknown).
        if labels.isin([0, 1]).all():
            frame["label"] = labels.astype("int64")
    frame.attrs["source"] = shown
    return frame


def norm_id(values: pd.Series) -> pd.Series:
    """Ids as clean text: stripped, and ``123.0`` (a float that went through a spreadsheet) → ``123``; NA stays NA.

    The importers write ids this way; :func:`read_manifest` reads every manifest's ids this way too.
    """
    text = values.astype("string").str.strip()
    return text.str.replace(r"^(\d+)\.0+$", r"\1", regex=True)


def _buffer(source: bytes | Path) -> io.BytesIO | Path:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, so that a message shows ``2``, not ``np.int64(2)``."""
    return value.item() if isinstance(value, np.generic) else value


def _file_rows(frame: pd.DataFrame, index: pd.Index) -> list[str]:
    """``"row N"`` of the file for rows of ``frame`` (by index label): its :data:`FILE_POSITION` where
    :func:`read_manifest` recorded one, else its position in ``frame`` (a table built in memory)."""
    recorded = FILE_POSITION in frame.columns
    positions = frame.loc[index, FILE_POSITION] if recorded else frame.index.get_indexer(index)
    return [row_label(p) for p in positions]


def validate_manifest(frame: pd.DataFrame, source: str, *, check_files: bool = True, use_cache: bool = True) -> None:
    """Check labels, ids and files of one manifest.

    Raises:
        ManifestError: naming the bad rows (first examples and a count), numbered as :data:`ROW_COUNTING` says.
    """
    if frame.empty:
        raise ManifestError(f"manifest {source}: no rows")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = frame.index[~labels.isin([0, 1])]
    if len(bad):
        rows = [
            f"{row} (image_id {frame.at[i, 'image_id']}, label {_plain(frame.at[i, 'label'])!r})"
            for row, i in zip(_file_rows(frame, bad[:5]), bad[:5], strict=True)
        ]
        raise ManifestError(
            f"manifest {source}: {len(bad)} label(s) outside {{0, 1}}: {'; '.join(rows)} ({ROW_COUNTING})"
        )
    dup = frame["image_id"][frame["image_id"].duplicated()].unique()
    if len(dup):
        raise ManifestError(f"manifest {source}: {len(dup)} duplicate image_id(s): {_examples(dup)}")
    for column in ("patient_id", "path"):
        empty = frame.index[frame[column].isna() | (frame[column].astype(str).str.len() == 0)]
        if len(empty):
            more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
            shown = ", ".join(_file_rows(frame, empty[:5])) + more
            raise ManifestError(f"manifest {source}: {len(empty)} row(s) with empty {column}: {shown} ({ROW_COUNTING})")
    if not check_files:
        return
    cached = use_cache and all(c in frame.columns for c in CACHE_COLUMNS) and frame["cache_file"].notna().all()
    column = "cache_file" if cached else "path"
    values = list(frame[column].unique())
    if not cached:
        remote = [p for p in values if is_remote(p)]
        if remote:
            # Images without a cache are decoded from local files by the training pipeline (imaging.decode).
            raise ManifestError(
                f"manifest {source}: {len(remote)} image path(s) are URIs, "
                f"e.g. {_examples(map(storage.public, remote), 3)}, "
                "and images without a pixel cache are decoded from local files only. Run prepare and put its "
                "manifests and cache/ folder on the bucket (the shards are read from URIs), or give paths on a "
                "file system every node mounts"
            )
    try:
        missing = storage.missing(values)
    except storage.StorageError as err:
        raise ManifestError(f"manifest {source}: cannot check its files: {err}") from err
    if missing:
        what = "pixel-cache shard(s)" if cached else "image file(s)"
        shown = [storage.public(p) for p in missing]
        raise ManifestError(f"manifest {source}: {len(missing)} missing {what}, e.g. {_examples(shown, 3)}")


def check_overlap(frames: dict[str, pd.DataFrame], refusing: str = "to train", within_dataset: bool = False) -> None:
    """Refuse splits that share a patient, an exam or an image id, or (with ``pixel_hash``) identical pixels.

    Args:
        within_dataset: compare ids within a ``dataset`` only (``dataset/id``): an external test set numbered 1…N
            beside RSNA's integer patient ids is other women. Splits of one preparation compare bare ids.

    Raises:
        ManifestError: naming the shared patients (and the splits they are in).
    """

    def ids(frame: pd.DataFrame, column: str) -> set:
        if within_dataset and "dataset" in frame.columns:
            return set(frame["dataset"].astype(str) + "/" + frame[column].astype(str))
        return set(frame[column])

    roles = list(frames)
    for i, first in enumerate(roles):
        for second in roles[i + 1 :]:
            for column, what in (("patient_id", "patient"), ("exam_id", "exam"), ("image_id", "image")):
                shared = sorted(ids(frames[first], column) & ids(frames[second], column))
                if shared:
                    raise ManifestError(
                        f"{len(shared)} {what}(s) appear in both {first} and {second} "
                        f"({frames[first].attrs.get('source', first)} / {frames[second].attrs.get('source', second)}): "
                        f"{_examples(shared, 10)}. Patient-level splits are required; refusing {refusing}."
                    )
            if "pixel_hash" in frames[first].columns and "pixel_hash" in frames[second].columns:
                shared = sorted(set(frames[first]["pixel_hash"].dropna()) & set(frames[second]["pixel_hash"].dropna()))
                if shared:
                    ids = frames[first].loc[frames[first]["pixel_hash"].isin(shared), "image_id"]
                    raise ManifestError(
                        f"{len(shared)} identical image(s) (same pixels) in both {first} and {second}: "
                        f"{_examples(ids, 10)}. Refusing {refusing}."
                    )


def load_manifests(
    paths: dict[str, str | Path | None], *, check_files: bool = True, use_cache: bool = True
) -> dict[str, pd.DataFrame]:
    """Read and validate the train/valid/test manifests that are given, and check them for leaks."""
    frames = {}
    for role, path in paths.items():
        if path is None:
            continue
        frame = read_manifest(path, role)
        validate_manifest(frame, storage.public(path), check_files=check_files, use_cache=use_cache)
        frames[role] = frame.drop(columns=FILE_POSITION)
    check_overlap(frames)
    return frames


def has_cache(frame: pd.DataFrame) -> bool:
    return all(c in frame.columns for c in CACHE_COLUMNS) and bool(frame["cache_file"].notna().all())


def check_cache_size(frame: pd.DataFrame, image_size, source: str, remedy: str) -> None:
    """Refuse a pixel cache smaller than the size the model is fed: upsampling adds pixels, not detail.

    A cache of at least ``image_size`` in both dimensions is resized down (area interpolation) as before. A smaller
    one would be resized up without a word, and a run "at 256×208" would see what a 128×96 cache holds, e.g. after
    the manifests were re-prepared at another size. ``remedy`` says what the caller's user can do about it.
    """
    if not has_cache(frame) or not {"cache_height", "cache_width"} <= set(frame.columns):
        return
    height, width = (int(v) for v in image_size)
    small = frame[(frame["cache_height"].astype(int) < height) | (frame["cache_width"].astype(int) < width)]
    if small.empty:
        return
    sizes = sorted({(int(h), int(w)) for h, w in zip(small["cache_height"], small["cache_width"], strict=True)})
    first = small.iloc[0]
    raise ManifestError(
        f"{source}: {len(small)} of {len(frame)} row(s) point at pixel-cache images of "
        f"{_examples([f'{h}×{w}' for h, w in sizes], 3)}, smaller than data.image_size {height}×{width} (first: "
        f"image_id {first['image_id']}, {first['cache_file']}); they would be upsampled and show no more detail "
        f"than the cache holds. {remedy}"
    )


def summary(frame: pd.DataFrame) -> dict[str, int]:
    return {
        "n_images": len(frame),
        "n_positive": int(frame["label"].sum()),
        "n_patients": int(frame["patient_id"].nunique()),
        "n_exams": int(frame["exam_id"].nunique()),
    }
