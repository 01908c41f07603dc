"""``prepare``: source tables → validated Parquet manifests plus the decode-once pixel cache.

Decoding a full-field mammogram costs 0.1–0.6 s of CPU while a GPU trains on hundreds of images per
second (DESIGN.md "Data flow"), so every image is decoded and preprocessed here, once. Steps:

1. import the source's own tables (``importers``; several ``--csv`` for sources that ship several);
2. optionally take a seeded, patient-level, label-stratified subset (``--smoke-test`` on the whole
   table; the reference's ``--dataset_partition``/``--finite_sample_rate``/``--rows_experiment`` on
   the training split, as ``train`` does);
3. split by patient (``importers.split_patients``) and refuse a patient or exam in two splits, before
   any Ray resource is taken;
4. preprocess the images in parallel Ray tasks, one cache shard per task, with a bounded number of
   tasks in flight so that the driver's memory stays flat however large the data set is. Shards hold
   ``--shard-size`` images, by default about 1/128 of the table (at most 256), so that a medium data
   set still gives every core work;
5. refuse identical pixels (``pixel_hash``) in two splits, write the manifests, the report and a
   summary.

Files that cannot be used go to ``prepare_report.csv`` (path, error) and the run goes on, unless more
than ``--max-bad-fraction`` of them fail. Shards are written to temporary names and renamed; a second
run reuses every shard whose index and pixel file agree and redoes the rest. The cache folder is named
by a hash of the preprocessing settings, so a cache built with another ``--size`` is never reused.
Inputs are only read: everything is written under ``--out``, which may not lie inside an image folder, be a
table's folder, or hold files prepare did not write.
On a multi-node cluster ``--out`` must be storage that every node mounts at the same path, because the
tasks write their shards directly.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mammo_ray import cache, io, manifest
from mammo_ray import config as config_mod

log = logging.getLogger(__name__)

# Bump when imaging changes what it writes, so old caches are not trusted. 2: JPEG 2000 decoded at reduced
# resolution where the output allows it (imaging.preprocess_file), prep_decode_reduction column. 3: Pixel Padding
# Value honoured (padding black, out of the crop), Presentation LUT Shape INVERSE inverts MONOCHROME2, "for
# processing" images refused, PNG8 voi "png8_identity"; prep_padding_pixels and prep_presentation_intent columns.
# 4: the window fallback's bright end is the brightest value two adjacent breast pixels reach, no longer the 99.5th
# percentile that saturated calcifications, with a knee at the breast's 99.5th percentile so that a clip cannot
# squeeze the tissue (imaging.PERCENTILE_FALLBACK).
PREPROCESS_VERSION = 4
REPORT = "prepare_report.csv"
SUMMARY = "prepare_summary.json"
CACHE_FOLDER = "cache"
# Everything prepare writes in --out. Any other item there is the user's, and the folder is refused: prepare
# replaces these names and removes the manifest of a split that a run leaves empty.
OUTPUT_FILES = (*(f"{role}.parquet" for role in manifest.SPLITS), REPORT, SUMMARY)
OUTPUT_ITEMS = (*OUTPUT_FILES, CACHE_FOLDER)
SMOKE_TEST_PATIENTS = 16
IN_FLIGHT_PER_CPU = 2  # enough queued work to keep every CPU busy while the driver collects results
# Automatic shard size (``auto_shard_size``). Shards are the unit of parallelism: 300 images in fixed 256-image
# shards made one task of 256 and one of 44, so one core idled most of the run and a third never started. About
# TARGET_SHARDS shards keep 32 cores busy for 4 rounds each (a short tail) and bound the per-shard cost (a task, an
# index write: about 12 ms of CPU each, measured) to a second or two per run. Shards grow to SMALL_SHARD_IMAGES
# images where that still leaves MIN_SHARDS of them, so that cost is spread over 4 images (0.4–3 s of full-field
# work) rather than one. The size depends on the table alone, not on the cluster, so a resumed run finds the same
# shards.
TARGET_SHARDS = 128
MIN_SHARDS = 16
SMALL_SHARD_IMAGES = 4
MAX_SHARD_IMAGES = 256
# What a task needs of a row: the shard name hashes the same columns, so a changed laterality is redone.
SHARD_COLUMNS = ("image_id", "path", "laterality")
_INT_COLUMNS = (
    "cache_offset",
    "cache_nbytes",
    "cache_height",
    "cache_width",
    "prep_original_height",
    "prep_original_width",
    "prep_crop_y0",
    "prep_crop_x0",
    "prep_crop_y1",
    "prep_crop_x1",
    "prep_decode_reduction",
    "prep_padding_pixels",
)
_BOOL_COLUMNS = ("prep_inverted", "prep_breast_found", "prep_flipped")


class PrepareError(RuntimeError):
    """Too many unusable files, leaking splits or an unsafe output folder; the message says how many and which."""


@dataclass
class PrepareResult:
    """What one ``prepare`` run produced (also written to ``prepare_summary.json``).

    Attributes:
        paths: manifest path per non-empty split.
        counts: per split, ``images``, ``positives``, ``patients`` and ``exams``.
        n_input: images asked for.
        n_failed: images that went to the report.
        shards_total: shards in the cache for this table.
        shards_reused: shards found complete and valid, not recomputed.
        images_processed: images decoded by this run (the others came from reused shards).
        seconds: wall time of the run.
        cache_dir: the cache folder for these preprocessing settings.
        cache_bytes: bytes of cached pixels referenced by the manifests.
        report: the report file.
        peak_in_flight: the most shard tasks that were running or queued at once.
        shard_size: images per shard (the last one may hold fewer).
        failed_reused: of ``n_failed``, the failures that came from reused shards (their files unchanged since).
        laterality_disagreements: image ids whose table laterality (L/R) is not their DICOM Image Laterality.
    """

    paths: dict[str, Path]
    counts: dict[str, dict[str, int]]
    n_input: int
    n_failed: int
    shards_total: int
    shards_reused: int
    images_processed: int
    seconds: float
    cache_dir: Path
    cache_bytes: int
    report: Path
    peak_in_flight: int = 0
    shard_size: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    failed_reused: int = 0
    laterality_disagreements: list[str] = field(default_factory=list)

    @property
    def n_cached(self) -> int:
        return sum(c["images"] for c in self.counts.values())

    def as_dict(self) -> dict:
        return {
            "counts": self.counts,
            "n_input": self.n_input,
            "n_failed": self.n_failed,
            "failed_reused": self.failed_reused,
            "laterality_disagreements": len(self.laterality_disagreements),
            "shards_total": self.shards_total,
            "shards_reused": self.shards_reused,
            "shard_size": self.shard_size,
            "images_processed": self.images_processed,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_processed / self.seconds, 2) if self.seconds > 0 else None,
            "cache_dir": str(self.cache_dir),
            "cache_bytes": self.cache_bytes,
            "bytes_per_image": round(self.cache_bytes / self.n_cached) if self.n_cached else None,
            "manifests": {role: str(path) for role, path in self.paths.items()},
            "report": str(self.report),
        }

    def summary_lines(self) -> list[str]:
        """The human summary printed at the end of ``main``."""
        rate = (
            f", {self.images_processed / self.seconds:.1f} images/s" if self.images_processed and self.seconds else ""
        )
        per_image = f", {self.cache_bytes / self.n_cached / 1024:.0f} KiB per image" if self.n_cached else ""
        lines = [
            f"prepared {self.n_cached} of {self.n_input} images in {self.seconds:.1f} s{rate}; "
            f"{self.n_failed} failed; {self.shards_reused} of {self.shards_total} shard(s) reused",
            f"  {'split':<6} {'images':>8} {'positives':>10} {'patients':>9}",
        ]
        for role, count in self.counts.items():
            lines.append(f"  {role:<6} {count['images']:>8} {count['positives']:>10} {count['patients']:>9}")
        for role, path in self.paths.items():
            lines.append(f"  {role}: {path}")
        lines.append(f"  cache: {self.cache_dir} ({self.cache_bytes / 2**20:.1f} MiB{per_image})")
        lines.append(f"  report: {self.report} ({self.n_failed} file(s))")
        if self.laterality_disagreements:
            shown = ", ".join(self.laterality_disagreements[:5])
            lines.append(
                f"  {len(self.laterality_disagreements)} image(s) whose table laterality is not their DICOM Image "
                f"Laterality ({shown}); the table's was used, and its label goes to that breast: check the source"
            )
        if self.failed_reused:
            lines.append(
                f"  {self.failed_reused} of the failures come from reused shards, whose files have not changed since; "
                "--retry-failed reads them again (e.g. after a network file system error)"
            )
        return lines


# --------------------------------------------------------------------------------------------------------
# Planning: subsets, splits, leak and output checks (pure pandas, no Ray)


def smoke_subset(table: pd.DataFrame, seed: int = 0, patients: int = SMOKE_TEST_PATIENTS) -> pd.DataFrame:
    """A seeded random, label-stratified subset of about ``patients`` patients (never "the first N")."""
    from mammo_ray import importers

    total = table["patient_id"].nunique()
    if total <= patients:
        return table
    return importers.subset_patients(table, fraction=patients / total, seed=seed)


def assign_splits(table: pd.DataFrame, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> pd.DataFrame:
    """Keep a complete ``split`` column (checked), else split by patient with ``importers.split_patients``.

    Raises:
        ValueError: split names outside train/valid/test, or bad fractions.
    """
    from mammo_ray import importers

    if "split" in table.columns and table["split"].notna().all():
        unknown = sorted(set(table["split"].astype(str)) - set(manifest.SPLITS))
        if unknown:
            raise ValueError(f"split column holds {', '.join(unknown)}; expected {', '.join(manifest.SPLITS)}")
        return table
    return importers.split_patients(table.drop(columns="split", errors="ignore"), fractions=fractions, seed=seed)


def subset_training(
    table: pd.DataFrame, *, fraction: float | None = None, n_rows: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """The reference's ``--dataset_partition``/``--finite_sample_rate`` (fraction of patients) or
    ``--rows_experiment`` (about that many images): a seeded, patient-level, label-stratified subset of
    the training split. Validation and test stay whole, so runs with different subsets stay comparable.
    """
    from mammo_ray import importers

    if fraction is None and n_rows is None:
        return table
    is_train = table["split"] == "train"
    if not is_train.any():
        raise ValueError("no training rows to subset")
    kept = importers.subset_patients(table[is_train], fraction=fraction, n_rows=n_rows, seed=seed)
    return table[~is_train | table.index.isin(kept.index)]


def leak_message(table: pd.DataFrame) -> str | None:
    """Name the patients, exams and images (same id, file or pixels) found in more than one split, or None."""
    from mammo_ray import importers

    leaks = importers.find_leaks(table)
    parts = []
    for key, column, what in (("patients", "patient_id", "patient"), ("exams", "exam_id", "exam")):
        ids = leaks[key]
        if ids:
            rows = table[table[column].astype(str).isin(ids)]
            where = rows.groupby(rows[column].astype(str))["split"].agg(lambda s: "/".join(sorted(set(s))))
            shown = ", ".join(f"{i} ({where[i]})" for i in ids[:10])
            parts.append(f"{len(ids)} {what}(s) in more than one split: {shown}{' ...' if len(ids) > 10 else ''}")
    if leaks["images"]:
        rows = table[table["image_id"].astype(str).isin(leaks["images"])]
        key = "pixel_hash" if "pixel_hash" in rows.columns and rows["pixel_hash"].notna().all() else "path"
        groups = []
        for value, group in rows.groupby(key, sort=True):
            if group["split"].nunique() < 2:
                continue
            members = ", ".join(
                f"{r.image_id} (patient {r.patient_id}, {r.dataset}, {r.split})" for r in group.itertuples(index=False)
            )
            groups.append(f"[{'pixels ' + str(value)[:12] if key == 'pixel_hash' else 'file ' + str(value)}] {members}")
        what = "identical image(s) (same pixels)" if key == "pixel_hash" else "image file(s) listed"
        parts.append(
            f"{len(groups)} {what} in more than one split: {'; '.join(groups[:10])}{' ...' if len(groups) > 10 else ''}"
        )
    if not parts:
        return None
    return (
        "; ".join(parts) + ". A patient-level split must keep every patient, exam and image in one split: give "
        "duplicated images the same patient_id (or drop them). Refusing to go on."
    )


def check_images_and_out(images: str, out: str) -> None:
    """Refuse, before any table is read or Ray starts, an ``--images`` that is not a local folder and an ``--out``
    that is a file.

    Before, a missing ``--images`` started Ray and reported every image as failed, a URI gave mangled paths
    (``s3:/bucket/…``: images are decoded from local files only), and a file as ``--out`` gave a traceback.

    Raises:
        PrepareError: naming the flag and the path.
    """
    if manifest.is_remote(str(images)):
        raise PrepareError(
            f"--images {images}: prepare decodes images from local files only (or a file system every node mounts); "
            "copy or mount them, and put the prepared manifests and cache on the bucket afterwards"
        )
    if not Path(images).is_dir():
        raise PrepareError(f"--images {images}: no such folder")
    if Path(out).exists() and not Path(out).is_dir():
        raise PrepareError(f"--out {out} is a file; name a folder for the manifests and the cache")


def check_output_folder(
    out: str | Path,
    images_root: str | Path | None = None,
    paths: Iterable[str] = (),
    tables: Iterable[str | Path] = (),
) -> None:
    """Refuse an output folder inside ``--images`` or inside any folder that holds an input image, and one that is
    the folder of a ``--csv`` table (``tables``).

    A subfolder of a table's folder is allowed (``--csv my.csv --out prepared``): it holds only what prepare writes,
    which :func:`check_own_output` makes sure of.

    Raises:
        PrepareError: naming both folders.
    """
    out_abs = Path(os.path.abspath(out))
    ancestors = {str(p) for p in (out_abs, *out_abs.parents)}
    ancestors |= {str(p) for p in (out_abs.resolve(), *out_abs.resolve().parents)}
    for table in tables:
        if manifest.is_remote(str(table)):
            continue
        folders = {os.path.dirname(os.path.abspath(table)), os.path.dirname(os.path.realpath(table))}
        if folders & {str(out_abs), str(out_abs.resolve())}:
            raise PrepareError(
                f"--out {out_abs} is the folder of --csv {table}; prepare never writes into input folders. "
                "Choose an --out of its own, e.g. a new subfolder."
            )
    if images_root is not None and not manifest.is_remote(str(images_root)):
        for root in {os.path.abspath(images_root), str(Path(images_root).resolve())}:
            if root in ancestors:
                raise PrepareError(
                    f"--out {out_abs} is inside --images {root}; prepare never writes into input folders. "
                    "Choose an --out outside the image tree."
                )
    # String work per path; one realpath per folder (not per file), as a folder reached through a symlink (an NFS
    # mount linked into a home folder) is the same folder: a million images in ten thousand folders cost a second.
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths if isinstance(p, str) and not manifest.is_remote(p)}
    folders |= {os.path.realpath(folder) for folder in folders}
    inside = sorted(folders & ancestors)
    if inside:
        raise PrepareError(
            f"--out {out_abs} is inside {inside[0]}, a folder that holds input images; prepare never writes "
            "into input folders. Choose an --out outside the image tree."
        )


def _is_own_temporary(name: str) -> bool:
    """A temporary file of an interrupted atomic write of one of prepare's outputs (``io.atomic_write``)."""
    return name.endswith(".tmp") and any(name.startswith(f".{item}.") for item in OUTPUT_FILES)


def check_own_output(out: str | Path) -> None:
    """Refuse an ``--out`` that holds files prepare did not write.

    prepare replaces its manifests, report and summary in ``--out`` and removes the manifest of a split that a run
    leaves empty. Run into the user's own folder (the one holding the table and the images, or a curated
    ``test.parquet``), that replaced or deleted their files. So ``--out`` must be new, empty, or an earlier prepare's
    output: nothing but :data:`OUTPUT_ITEMS` (and temporaries of its atomic writes), with ``prepare_summary.json`` or
    a ``cache/<settings>/settings.json`` (written first, so a run that failed later is still resumed) to show that
    prepare wrote them.

    Raises:
        PrepareError: naming the folder and the first items prepare did not write.
    """
    out = Path(out)
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    foreign = [name for name in names if name not in OUTPUT_ITEMS and not _is_own_temporary(name)]
    ours = (out / SUMMARY).is_file() or any((out / CACHE_FOLDER).glob("*/settings.json"))
    if foreign or (names and not ours):
        shown = ", ".join((foreign or names)[:5]) + (" ..." if len(foreign or names) > 5 else "")
        raise PrepareError(
            f"--out {out} holds files prepare did not write ({shown}); prepare writes {', '.join(OUTPUT_FILES)} and "
            f"{CACHE_FOLDER}/ there and would replace or delete files of those names. Name a new or empty folder, "
            "or the --out of an earlier prepare (to resume it)."
        )


def _listed_manifests(out: Path) -> set[str]:
    """File names of the manifests the previous run's ``prepare_summary.json`` lists: the only ones prepare may
    delete. Names, not paths, so that a prepared folder that was moved still counts as prepare's own."""
    try:
        listed = json.loads((out / SUMMARY).read_text())["manifests"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {Path(str(path)).name for path in listed}


# --------------------------------------------------------------------------------------------------------
# Shards


def _shard_name(index: int, rows: pd.DataFrame) -> str:
    text = "\n".join(
        rows["image_id"].astype(str) + "\t" + rows["path"].astype(str) + "\t" + rows["laterality"].astype(str)
    )
    return f"shard-{index:05d}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def process_shard(
    rows: pd.DataFrame, shard_path: str, size: tuple[int, int], reduced_decode: bool = True
) -> pd.DataFrame:
    """Preprocess one shard's images and write ``<shard>.bin`` plus ``<shard>.index.parquet``.

    Both files go to temporary names first and are renamed, the index last, so a shard whose index
    exists is complete. Runs inside a Ray task, or directly. ``reduced_decode`` is passed on to
    ``imaging.preprocess_file`` (JPEG 2000 decoded at reduced resolution where ``size`` allows).

    Returns:
        The index: one row per input image with the cache location, ``pixel_hash`` and the ``prep_*``
        provenance, or its ``error``.
    """
    from mammo_ray import imaging

    shard = Path(shard_path)
    index_path = shard.with_suffix(".index.parquet")
    records = []
    bin_tmp = shard.with_name(f".{shard.name}.{os.getpid()}.tmp")
    offset = 0
    try:
        with open(bin_tmp, "wb") as out:
            for row in rows.itertuples(index=False):
                side = row.laterality if row.laterality in ("L", "R") else None
                # Taken before the read: a file replaced while it is read then looks changed to the next run.
                source_size, source_mtime_ns = source_stat(row.path)
                stats = {"source_size": source_size, "source_mtime_ns": source_mtime_ns}
                try:
                    pixels, provenance = imaging.preprocess_file(
                        row.path, size=size, laterality=side, reduced_decode=reduced_decode
                    )
                    blob = cache.encode(pixels)
                except Exception as err:  # every failure is reported per file and the run goes on
                    records.append(
                        {"image_id": row.image_id, "path": row.path, "error": f"{type(err).__name__}: {err}", **stats}
                    )
                    continue
                out.write(blob)
                records.append(
                    {
                        "image_id": row.image_id,
                        "path": row.path,
                        **stats,
                        "cache_file": shard.name,
                        "cache_offset": offset,
                        "cache_nbytes": len(blob),
                        "cache_height": pixels.shape[0],
                        "cache_width": pixels.shape[1],
                        "pixel_hash": imaging.pixel_hash(pixels),
                        "error": None,
                        **provenance.as_columns(),
                    }
                )
                offset += len(blob)
        os.replace(bin_tmp, shard)
    finally:
        bin_tmp.unlink(missing_ok=True)
    index = pd.DataFrame(records)
    for column in SOURCE_STAT_COLUMNS:
        # From the Python ints: a column with a None in it would pass through float64 and round nanoseconds.
        index[column] = pd.array([record[column] for record in records], dtype="Int64")
    io.atomic_write_parquet(index_path, index)
    return index


SOURCE_STAT_COLUMNS = ("source_size", "source_mtime_ns")


def source_stat(path: str) -> tuple[int | None, int | None]:
    """A source file's size and modification time (ns), as recorded with its cached pixels; None, None when the
    file cannot be read (missing, a URI)."""
    try:
        info = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None, None
    return info.st_size, info.st_mtime_ns


def changed_sources(indices: Sequence[pd.DataFrame], threads: int = 16) -> list[bool]:
    """For each reusable shard index, whether any of its source files changed since it was cached.

    A file replaced in place (re-exported, re-downloaded, fixed after a failure) keeps its path and image id, so
    the shard name alone would reuse pixels of the old file. Its size and modification time are compared with what
    the index recorded, as ``make`` and ``rsync`` do. An index without that record (written before it existed) is
    redone. The stats run in threads, as a network file system answers each one with a round trip.
    """
    from concurrent.futures import ThreadPoolExecutor

    usable = [all(column in index.columns for column in SOURCE_STAT_COLUMNS) for index in indices]
    paths = [path for index, ok in zip(indices, usable, strict=True) if ok for path in index["path"].astype(str)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        now = dict(zip(paths, pool.map(source_stat, paths), strict=True))

    def recorded(value) -> int | None:
        return None if pd.isna(value) else int(value)

    changed = []
    for index, ok in zip(indices, usable, strict=True):
        changed.append(
            not ok
            or any(
                now[str(path)] != (recorded(size), recorded(mtime))
                for path, size, mtime in index[["path", *SOURCE_STAT_COLUMNS]].itertuples(index=False)
            )
        )
    return changed


def load_complete_shard(
    shard: Path,
    image_ids: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
    *,
    verify: bool | str = True,
) -> pd.DataFrame | None:
    """The index of a complete, valid shard, or None when it must be redone.

    Valid means: the index reads; it lists exactly ``image_ids``; its images have ``size``; their
    frames lie end to end from offset 0 and fill the pixel file exactly (a truncated or padded file is
    redone); with ``verify``, the first and last frames decompress; with ``verify="all"`` (``--verify-cache``),
    every frame decompresses to the pixels whose ``pixel_hash`` the index recorded, which also finds bytes
    damaged inside a frame of the right length.
    """
    index_path = shard.with_suffix(".index.parquet")
    if not (index_path.is_file() and shard.is_file()):
        return None
    try:
        index = pd.read_parquet(index_path)
    except Exception:  # a damaged index is redone, never trusted
        return None
    if "image_id" not in index.columns or "error" not in index.columns:
        return None
    if image_ids is not None and sorted(index["image_id"].astype(str)) != sorted(map(str, image_ids)):
        return None
    good = index[index["error"].isna()]
    if good.empty:
        return index if shard.stat().st_size == 0 else None
    try:
        good = good.sort_values("cache_offset")
        offsets = good["cache_offset"].astype("int64").to_numpy()
        nbytes = good["cache_nbytes"].astype("int64").to_numpy()
        shapes = set(zip(good["cache_height"].astype(int), good["cache_width"].astype(int), strict=True))
    except (KeyError, TypeError, ValueError):
        return None
    if size is not None and shapes != {tuple(size)}:
        return None
    if offsets[0] != 0 or (offsets[1:] != offsets[:-1] + nbytes[:-1]).any():
        return None
    if int(offsets[-1] + nbytes[-1]) != shard.stat().st_size:
        return None
    if verify:
        from mammo_ray import imaging

        rows = good if verify == "all" else good.iloc[[0, -1]]
        try:
            with cache.open_shard(str(shard)) as handle:
                for row in rows.itertuples(index=False):
                    pixels = cache.read_image(
                        str(shard), row.cache_offset, row.cache_nbytes, row.cache_height, row.cache_width, handle
                    )
                    if verify == "all" and imaging.pixel_hash(pixels) != row.pixel_hash:
                        return None
        except Exception:
            return None
    return index


def auto_shard_size(n_images: int) -> int:
    """Images per shard when ``--shard-size`` is not given.

    ``n_images / TARGET_SHARDS`` rounded up, but at least ``SMALL_SHARD_IMAGES`` where that still leaves
    ``MIN_SHARDS`` shards (else as many one-image shards as it takes), and at most ``MAX_SHARD_IMAGES``.
    E.g. 6 images: 6 shards of 1; 48: 16 of 3; 300: 75 of 4; 10,000: 127 of 79; 100,000: 391 of 256.
    """
    floor = min(SMALL_SHARD_IMAGES, math.ceil(n_images / MIN_SHARDS))
    return max(1, min(MAX_SHARD_IMAGES, max(floor, math.ceil(n_images / TARGET_SHARDS))))


def _shard_task(rows: pd.DataFrame, shard_path: str, size: tuple[int, int], reduced_decode: bool) -> pd.DataFrame:
    """``process_shard`` as a Ray task, which holds one CPU: OpenCV's own thread pool (one thread per core by
    default) would only compete with the other tasks for the cores they hold."""
    import cv2

    cv2.setNumThreads(1)
    _reuse_freed_memory()
    return process_shard(rows, shard_path, size, reduced_decode)


@functools.cache  # once per worker process
def _reuse_freed_memory() -> None:
    """Make glibc keep freed large blocks for the next image instead of returning them to the kernel.

    Each full-field image allocates a few arrays of 27–54 MB; by default glibc maps every one fresh and unmaps it
    when freed, so each image pays again for page faults on every byte it touches. Measured on one core with the
    benchmark's 4096×3328 files: 0.10–0.13 → 0.08 CPU-s per uncompressed image, 0.54–0.63 → 0.49–0.54 per
    JPEG 2000 image, and the process's resident memory stays flat over 96 images (259 MiB, against a 227 MiB
    peak before). Ray workers belong to one job, so the setting reaches no other program. Linux/glibc only;
    elsewhere nothing changes.
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, malloc.h
    mallopt(m_mmap_threshold, 512 * 2**20)  # blocks under 512 MB come from the heap, where frees are reused
    mallopt(m_trim_threshold, 1024 * 2**20)  # and the heap is not shrunk for less than 1 GB of free space


def _failed_shard(rows: pd.DataFrame, err: BaseException) -> pd.DataFrame:
    """Every image of a shard whose task died (worker crash, out of memory, disk full) is reported, not lost."""
    cause = getattr(err, "cause", None) or err
    reason = " ".join(str(cause).split("\n")[0].split()) or type(cause).__name__
    message = f"shard task failed ({type(cause).__name__}: {reason})"
    return pd.DataFrame({"image_id": rows["image_id"], "path": rows["path"], "error": message})


def _check_visible(shard: Path, index: pd.DataFrame) -> None:
    good = index[index["error"].isna()] if "error" in index.columns else index
    expected = int(good["cache_nbytes"].sum()) if len(good) else 0
    if not shard.is_file() or shard.stat().st_size != expected:
        raise PrepareError(
            f"a Ray task wrote {shard.name}, but this driver does not see it at {shard}. On a multi-node cluster "
            "--out must be storage that every node mounts at the same path (NFS, a shared volume)."
        )


def _default_in_flight() -> int:
    import ray

    return max(1, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))


def _remove_stale_temporaries(folder: Path, older_than: float) -> None:
    """Temporary files of interrupted runs are never read; remove those that predate this run."""
    for tmp in folder.glob(".*.tmp"):
        try:
            if tmp.stat().st_mtime < older_than:
                tmp.unlink()
                log.debug("removed stale temporary file %s", tmp)
        except OSError:
            pass


def _normalise_types(frame: pd.DataFrame) -> pd.DataFrame:
    # Concatenating error-only indices with good ones turns integers into floats; restore the real types.
    for column in _INT_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].astype("int64")
    for column in _BOOL_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].astype(bool)
    return frame


# --------------------------------------------------------------------------------------------------------
# The run


def prepare_table(
    table: pd.DataFrame,
    out: str | Path,
    *,
    size: tuple[int, int],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    shard_size: int | None = None,
    progress: bool = True,
    images_root: str | Path | None = None,
    max_in_flight: int | None = None,
    retry_failed: bool = False,
    reduced_decode: bool = True,
    verify_cache: bool = False,
) -> PrepareResult:
    """Split (when ``table`` has no ``split``), preprocess and write the manifests. Ray must be initialised.

    Args:
        table: manifest rows from an importer, with or without ``split``.
        out: output folder (manifests, ``cache/``, report, summary).
        size: (H, W) of the cached images.
        fractions: train/valid/test fractions of patients when ``table`` has no ``split``.
        seed: seed of that split.
        max_bad_fraction: the run fails when more than this share of the images cannot be used.
        shard_size: images per shard (one Ray task each); default :func:`auto_shard_size` of the table.
        progress: show a tqdm bar.
        images_root: the input image folder; ``out`` may not lie inside it. ``out`` must be new, empty or an
            earlier prepare's output (:func:`check_own_output`).
        max_in_flight: most shard tasks submitted at once; default ``2 × cluster CPUs``.
        retry_failed: redo reused shards that hold failed images (e.g. after a network file system error).
        reduced_decode: decode JPEG 2000 at reduced resolution where ``size`` allows
            (``imaging.preprocess_file``); False decodes every pixel. Part of the cache key.
        verify_cache: decode every frame of a reusable shard and check its ``pixel_hash`` (a read of the whole
            cache); by default only the first and last frames are decoded.

    Raises:
        PrepareError: too many failures (the report is written first), leaking splits, an unsafe ``out``.
        ManifestError: the written frames fail the manifest overlap check.
    """
    import ray

    from mammo_ray import imaging

    started = time.perf_counter()
    wall_start = time.time()
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    out = Path(os.path.abspath(out))
    manifest.validate_manifest(table, "prepare input", check_files=False)
    check_output_folder(out, images_root, table["path"])
    check_own_output(out)
    table = assign_splits(table, fractions, seed).sort_values("image_id").reset_index(drop=True)
    problem = leak_message(table)
    if problem:
        raise PrepareError(problem)

    # The reduced decode changes pixels (slightly), so its rule is part of the cache key.
    reduction = {"j2k_min_oversampling": imaging.MIN_OVERSAMPLING} if reduced_decode else False
    settings = {"size": [int(s) for s in size], "preprocess": PREPROCESS_VERSION, "reduced_decode": reduction}
    key = cache.settings_key(settings)
    cache_dir = out / CACHE_FOLDER / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(
        cache_dir / "settings.json", {**settings, "cache_format": cache.CACHE_FORMAT_VERSION, "dtype": "uint16"}
    )

    indices: list[pd.DataFrame] = []
    queue: deque[tuple[Path, pd.DataFrame]] = deque()
    n_shards = 0
    shard_size = shard_size or auto_shard_size(len(table))
    complete: list[tuple[Path, pd.DataFrame, pd.DataFrame]] = []
    for number, start in enumerate(range(0, len(table), shard_size)):
        rows = table.iloc[start : start + shard_size][list(SHARD_COLUMNS)].reset_index(drop=True)
        shard = cache_dir / f"{_shard_name(number, rows)}.bin"
        n_shards += 1
        done = load_complete_shard(
            shard, rows["image_id"].tolist(), tuple(size), verify="all" if verify_cache else True
        )
        if done is not None and not (retry_failed and done["error"].notna().any()):
            complete.append((shard, rows, done))
        else:
            queue.append((shard, rows))
    changed = changed_sources([done for _, _, done in complete])
    for (shard, rows, done), redo in zip(complete, changed, strict=True):
        if redo:
            queue.append((shard, rows))
        else:
            indices.append(done)
    if any(changed):
        log.info(
            "prepare: %d complete shard(s) redone: their source files changed since they were cached", sum(changed)
        )
    reused = len(indices)
    reused_failures = sum(int(index["error"].notna().sum()) for index in indices)
    to_process = sum(len(rows) for _, rows in queue)
    log.info("prepare: %d image(s) in %d shard(s), %d reused, cache %s", len(table), n_shards, reused, cache_dir)

    bar = None
    if progress and queue:
        from tqdm import tqdm

        bar = tqdm(total=to_process, unit="img", desc="prepare", file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix(reused_shards=reused, failed=0)
    remote = ray.remote(num_cpus=1, max_retries=2)(_shard_task)
    in_flight: dict = {}
    peak_in_flight = 0
    failed_so_far = 0
    try:
        while queue or in_flight:
            limit = max_in_flight or _default_in_flight()  # re-read: an autoscaling cluster grows while we run
            while queue and len(in_flight) < limit:
                shard, rows = queue.popleft()
                in_flight[remote.remote(rows, str(shard), tuple(size), reduced_decode)] = (shard, rows)
            peak_in_flight = max(peak_in_flight, len(in_flight))
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            shard, rows = in_flight.pop(ready[0])
            try:
                index = ray.get(ready[0])
            except Exception as err:  # a dead worker loses its shard, not the run; the images are reported
                log.warning("shard %s failed: %s", shard.name, err)
                index = _failed_shard(rows, err)
            else:
                _check_visible(shard, index)
            indices.append(index)
            failed_so_far += int(index["error"].notna().sum())
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(reused_shards=reused, failed=failed_so_far)
    finally:
        for ref in in_flight:
            ray.cancel(ref)
        if bar is not None:
            bar.close()

    index = pd.concat(indices, ignore_index=True)
    failed = index[index["error"].notna()]
    report = (
        table[["image_id", "path"]]
        .merge(failed[["image_id", "error"]], on="image_id", how="inner")
        .sort_values("image_id")[["path", "error", "image_id"]]
    )
    report_path = io.atomic_write_csv(out / REPORT, report)
    bad_fraction = len(report) / max(1, len(table))
    if bad_fraction > max_bad_fraction:
        examples = "; ".join(f"{p}: {e}" for p, e in report[["path", "error"]].head(3).itertuples(index=False))
        raise PrepareError(
            f"{len(report)} of {len(table)} files ({bad_fraction:.1%}) could not be used, more than "
            f"--max-bad-fraction {max_bad_fraction:.1%}; see {report_path}. First: {examples}"
        )

    if len(report) == len(table):
        raise PrepareError(f"none of the {len(table)} files could be used; see {report_path}")
    dropped = ["error", "path", *SOURCE_STAT_COLUMNS]
    good = _normalise_types(index[index["error"].isna()].drop(columns=dropped, errors="ignore").copy())
    merged = table.merge(good, on="image_id", how="inner")
    merged["cache_file"] = [f"cache/{key}/{name}" for name in merged["cache_file"]]
    # Image paths stay absolute (the images live outside --out); cache paths are relative to the manifests.
    merged["path"] = [p if manifest.is_remote(p) else os.path.abspath(p) for p in merged["path"]]
    problem = leak_message(merged)
    if problem:
        raise PrepareError(problem)
    disagreements = laterality_disagreements(merged)
    if disagreements:
        log.warning(
            "prepare: %d image(s) whose table laterality is not their DICOM Image Laterality, e.g. %s",
            len(disagreements),
            ", ".join(disagreements[:5]),
        )
    duplicates = int(merged["pixel_hash"].duplicated().sum())
    if duplicates:
        log.warning("prepare: %d image(s) have the same pixels as another image of the same split", duplicates)
    frames = {role: merged[merged["split"] == role].reset_index(drop=True) for role in manifest.SPLITS}
    frames = {role: frame for role, frame in frames.items() if not frame.empty}
    for role, frame in frames.items():
        frame.attrs["source"] = role
    manifest.check_overlap(frames)

    listed = _listed_manifests(out)  # read before this run's summary replaces it
    paths = {role: io.atomic_write_parquet(out / f"{role}.parquet", frame) for role, frame in frames.items()}
    for role in manifest.SPLITS:
        stale = out / f"{role}.parquet"
        if role in paths or not stale.is_file():
            continue
        if stale.name in listed:
            stale.unlink()  # an older run's manifest for a split that is now empty would mix two preparations
            log.info("prepare: removed %s (the %s split is empty in this run)", stale, role)
        else:
            log.warning(
                "prepare: left %s in place although the %s split is empty in this run: the previous %s does not "
                "list it, so prepare did not write it (or was interrupted before its summary); it is not part of "
                "this preparation",
                stale,
                role,
                SUMMARY,
            )
    _remove_stale_temporaries(cache_dir, wall_start)
    result = PrepareResult(
        paths=paths,
        counts={
            role: {
                "images": len(frame),
                "positives": int(frame["label"].sum()),
                "patients": int(frame["patient_id"].nunique()),
                "exams": int(frame["exam_id"].nunique()),
            }
            for role, frame in frames.items()
        },
        n_input=len(table),
        n_failed=len(report),
        shards_total=n_shards,
        shards_reused=reused,
        images_processed=to_process,
        seconds=time.perf_counter() - started,
        cache_dir=cache_dir,
        cache_bytes=int(merged["cache_nbytes"].sum()),
        report=report_path,
        peak_in_flight=peak_in_flight,
        shard_size=shard_size,
        failures=list(report[["path", "error"]].itertuples(index=False, name=None)),
        failed_reused=reused_failures,
        laterality_disagreements=disagreements,
    )
    io.atomic_write_json(out / SUMMARY, result.as_dict())
    log.info("prepare: %d images cached, %d failed, %d shard(s) reused", result.n_cached, len(report), reused)
    return result


def laterality_disagreements(frame: pd.DataFrame) -> list[str]:
    """Image ids whose table laterality (L or R) differs from the file's own (``prep_tag_laterality``)."""
    if "prep_tag_laterality" not in frame or "laterality" not in frame:
        return []
    table = frame["laterality"].astype(str).str.upper()
    tag = frame["prep_tag_laterality"].fillna("").astype(str).str.upper()
    differ = table.isin(["L", "R"]) & tag.isin(["L", "R"]) & (table != tag)
    return frame.loc[differ, "image_id"].astype(str).tolist()


def run(table: pd.DataFrame, out: str | Path, **kwargs) -> dict[str, Path]:
    """:func:`prepare_table`, returning ``{"train": path, "valid": path, "test": path}`` for the non-empty splits."""
    return prepare_table(table, out, **kwargs).paths


# --------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from mammo_ray.importers import SOURCES

    parser = argparse.ArgumentParser(prog="mammo-ray prepare", description="Build manifests and the pixel cache.")
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--csv", action="append", required=True, help="source table (repeat for several)")
    parser.add_argument("--images", required=True, help="root folder of the images (only read)")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (manifests, cache, report): new, empty or an earlier prepare's; not inside --images",
    )
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        default=[1024, 512],
        metavar=("H", "W"),
        help="cached image size (default 1024 512)",
    )
    parser.add_argument(
        "--split",
        nargs=3,
        type=float,
        default=[0.7, 0.15, 0.15],
        metavar=("TRAIN", "VALID", "TEST"),
        help="patient-level fractions (default 0.7 0.15 0.15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of every subset")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05, help="fail above this share of bad files")
    parser.add_argument(
        "--shard-size",
        type=int,
        help=f"images per cache shard (one Ray task); default about 1/{TARGET_SHARDS} of the images, at least "
        f"{SMALL_SHARD_IMAGES} where that still gives {MIN_SHARDS} shards, at most {MAX_SHARD_IMAGES}, so that every "
        "core gets work on a medium data set",
    )
    parser.add_argument(
        "--full-resolution-decode",
        action="store_true",
        help="decode every JPEG 2000 pixel; by default JPEG 2000 is decoded at the coarsest resolution level "
        "that still gives the resize enough pixels (faster; a separate cache)",
    )
    parser.add_argument("--address", help="join an existing Ray cluster (e.g. auto); --out must be shared storage")
    subset = parser.add_argument_group("subsets (seeded, patient-level, label-stratified; of the training split)")
    subset.add_argument(
        "--dataset_partition", "--dataset-partition", type=float, help="keep this fraction of training patients"
    )
    subset.add_argument("--finite_sample_rate", "--finite-sample-rate", type=float, help="same as --dataset_partition")
    subset.add_argument(
        "--rows_experiment", "--rows-experiment", type=int, help="keep whole patients up to about this many images"
    )
    parser.add_argument("--retry-failed", action="store_true", help="redo reused shards that hold failed images")
    parser.add_argument(
        "--verify-cache",
        action="store_true",
        help="decode every cached frame of a reused shard and check its pixel hash (reads the whole cache); by "
        "default only each shard's first and last frames are decoded",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help=f"a seeded random, label-stratified subset of about {SMOKE_TEST_PATIENTS} patients",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _training_subset_args(args: argparse.Namespace) -> tuple[float | None, int | None]:
    fractions = {v for v in (args.dataset_partition, args.finite_sample_rate) if v is not None}
    if len(fractions) > 1:
        raise ValueError(
            f"--dataset_partition {args.dataset_partition} and --finite_sample_rate {args.finite_sample_rate} "
            "disagree; they mean the same thing, give one"
        )
    fraction = fractions.pop() if fractions else None
    if fraction is not None and args.rows_experiment is not None:
        raise ValueError("give either a fraction (--dataset_partition/--finite_sample_rate) or --rows_experiment")
    return fraction, args.rows_experiment


def plan(table: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """Everything ``main`` decides before Ray starts: subsets, split, validation, leak and output checks.

    Raises:
        ValueError, ManifestError, PrepareError: with the reason.
    """
    size = tuple(args.size)
    if len(size) != 2 or min(size) < config_mod.MIN_IMAGE_SIDE:
        raise ValueError(
            f"--size must be two integers of at least {config_mod.MIN_IMAGE_SIDE} (ConvNeXt's total stride; data.image_size refuses "
            f"less), got {' '.join(map(str, args.size))}"
        )
    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")
    for flag, value in (
        ("--dataset_partition", args.dataset_partition),
        ("--finite_sample_rate", args.finite_sample_rate),
    ):
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{flag} is a fraction of the training patients, in (0, 1]; got {value}")
    if args.rows_experiment is not None and args.rows_experiment < 1:
        raise ValueError(f"--rows_experiment must be at least 1, got {args.rows_experiment}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    if args.shard_size is not None and args.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {args.shard_size}")
    fraction, n_rows = _training_subset_args(args)
    if args.smoke_test:
        table = smoke_subset(table, seed=args.seed)
    manifest.validate_manifest(table.assign(split="all"), ", ".join(map(str, args.csv)), check_files=False)
    table = assign_splits(table, tuple(args.split), args.seed)
    table = subset_training(table, fraction=fraction, n_rows=n_rows, seed=args.seed)
    check_output_folder(args.out, args.images, table["path"], args.csv)
    problem = leak_message(table)
    if problem:
        raise PrepareError(problem)
    return table


def main(argv: list[str] | None = None) -> int:
    from mammo_ray import cli, importers

    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    try:
        check_images_and_out(args.images, args.out)
        check_output_folder(args.out, args.images, tables=args.csv)  # before reading a single table
        check_own_output(args.out)
        table = importers.import_source(args.source, args.csv, args.images)
        table = plan(table, args)
        cli.start_ray(address=args.address, verbose=args.verbose)
    except (ValueError, manifest.ManifestError, PrepareError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = prepare_table(
            table,
            args.out,
            size=tuple(args.size),
            max_bad_fraction=args.max_bad_fraction,
            shard_size=args.shard_size,
            reduced_decode=not args.full_resolution_decode,
            progress=not args.no_progress,
            images_root=args.images,
            retry_failed=args.retry_failed,
            verify_cache=args.verify_cache,
        )
    except (PrepareError, manifest.ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(result.summary_lines()))
    return 0


if __name__ == "__main__":
    # Run the importable module, not this ``__main__`` copy: Ray pickles a ``__main__`` function by value, and the
    # cached ``_reuse_freed_memory`` it calls by name, which a Ray worker cannot find in its own ``__main__``.
    from mammo_ray import prepare as _module

    raise SystemExit(_module.main())
