"""``prepare``: source tables → validated Parquet manifests plus the decode-once pixel cache.

Steps: import the source's own tables (``importers``), split by patient (seeded, stratified),
then decode and preprocess every image once, in parallel Ray tasks, one shard of images per task
(``cache``). Files that cannot be used go to ``prepare_report.csv`` (path, error) and the run goes
on, unless more than ``--max-bad-fraction`` of them fail. A second run skips the shards that are
complete and redoes the rest; a cache built with other settings lives in another folder and is
never reused. Inputs are only read: everything is written under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd

from mammo_ray import cache, io, manifest

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1  # bump when imaging changes what it writes, so old caches are not trusted
REPORT = "prepare_report.csv"


class PrepareError(RuntimeError):
    """Too many unusable files, or leaking splits; the message says how many and which."""


def _shard_name(index: int, rows: pd.DataFrame) -> str:
    digest = hashlib.sha1("\n".join(rows["image_id"] + "\t" + rows["path"]).encode()).hexdigest()[:10]
    return f"shard-{index:05d}-{digest}"


def process_shard(rows: pd.DataFrame, shard_path: str, size: tuple[int, int]) -> pd.DataFrame:
    """Preprocess one shard's images and write ``<shard>.bin`` plus ``<shard>.index.parquet``.

    Returns the index: one row per input image with the cache location and provenance, or the error.
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
                try:
                    pixels, provenance = imaging.preprocess_file(row.path, size=size, laterality=side)
                    blob = cache.encode(pixels)
                except Exception as err:  # every failure is reported per file and the run goes on
                    records.append(
                        {"image_id": row.image_id, "path": row.path, "error": f"{type(err).__name__}: {err}"}
                    )
                    continue
                out.write(blob)
                records.append(
                    {
                        "image_id": row.image_id,
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
    io.atomic_write_parquet(index_path, index)
    return index


def _load_complete_shard(shard: Path) -> pd.DataFrame | None:
    index_path = shard.with_suffix(".index.parquet")
    if not (index_path.is_file() and shard.is_file()):
        return None
    try:
        index = pd.read_parquet(index_path)
    except Exception:  # a damaged index is redone, never trusted
        return None
    good = index[index["error"].isna()] if "error" in index.columns else index
    if len(good) and int(good["cache_offset"].max() + good.loc[good["cache_offset"].idxmax(), "cache_nbytes"]) != (
        shard.stat().st_size
    ):
        return None
    return index


def run(
    table: pd.DataFrame,
    out: str | Path,
    *,
    size: tuple[int, int],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    shard_size: int = 256,
    progress: bool = True,
) -> dict[str, Path]:
    """Split, preprocess and write manifests for an imported table. Ray must be initialised.

    Returns:
        ``{"train": path, "valid": path, "test": path}`` for the non-empty splits.
    """
    import ray

    from mammo_ray import importers

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    table = table.sort_values("image_id").reset_index(drop=True)
    if "split" not in table.columns:
        table = importers.split_patients(table, fractions=fractions, seed=seed)
    key = cache.settings_key({"size": list(size), "preprocess": PREPROCESS_VERSION})
    cache_dir = out / "cache" / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(cache_dir / "settings.json", {"size": list(size), "preprocess": PREPROCESS_VERSION})

    chunks = [table.iloc[i : i + shard_size] for i in range(0, len(table), shard_size)]
    indices, pending = [], []
    remote = ray.remote(num_cpus=1, max_retries=2)(process_shard)
    for number, rows in enumerate(chunks):
        shard = cache_dir / f"{_shard_name(number, rows)}.bin"
        done = _load_complete_shard(shard)
        if done is not None:
            indices.append(done)
            continue
        columns = rows[["image_id", "path", "laterality"]].copy()
        pending.append(remote.remote(columns, str(shard), tuple(size)))
    skipped = len(indices)
    bar = None
    if progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc=f"prepare ({skipped} shard(s) already done)", unit="shard")
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        indices.append(ray.get(ready[0]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    index = pd.concat(indices, ignore_index=True) if indices else pd.DataFrame(columns=["image_id", "error"])
    failed = index[index["error"].notna()]
    report = table[["image_id", "path"]].merge(failed[["image_id", "error"]], on="image_id", how="inner")
    io.atomic_write_csv(out / REPORT, report[["path", "error", "image_id"]])
    bad_fraction = len(report) / max(1, len(table))
    if bad_fraction > max_bad_fraction:
        raise PrepareError(
            f"{len(report)} of {len(table)} files ({bad_fraction:.1%}) could not be used, more than "
            f"--max-bad-fraction {max_bad_fraction:.1%}; see {out / REPORT}. First: "
            + "; ".join(f"{p}: {e}" for p, e in report[["path", "error"]].head(3).itertuples(index=False))
        )
    good = index[index["error"].isna()].drop(columns=["error"])
    merged = table.merge(good, on="image_id", how="inner")
    merged["cache_file"] = [str(Path("cache") / key / name) for name in merged["cache_file"]]
    # Image paths stay absolute (the images live outside --out); cache paths are relative to the manifests.
    merged["path"] = [p if manifest.is_remote(p) else str(Path(p).resolve()) for p in merged["path"]]
    frames = {role: merged[merged["split"] == role].reset_index(drop=True) for role in manifest.SPLITS}
    frames = {role: frame for role, frame in frames.items() if not frame.empty}
    for role, frame in frames.items():
        frame.attrs["source"] = role
    manifest.check_overlap(frames)
    paths = {}
    for role, frame in frames.items():
        paths[role] = io.atomic_write_parquet(out / f"{role}.parquet", frame)
    log.info("prepare: %d images cached, %d failed, %d shard(s) reused", len(merged), len(report), skipped)
    return paths


def build_parser() -> argparse.ArgumentParser:
    from mammo_ray.importers import SOURCES

    parser = argparse.ArgumentParser(prog="mammo-ray prepare", description="Build manifests and the pixel cache.")
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--csv", action="append", required=True, help="source table (repeat for several)")
    parser.add_argument("--images", required=True, help="root folder of the images")
    parser.add_argument("--out", required=True, help="output folder (manifests, cache, report)")
    parser.add_argument("--size", nargs=2, type=int, default=[1024, 512], metavar=("H", "W"))
    parser.add_argument("--split", nargs=3, type=float, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VALID", "TEST"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    parser.add_argument("--max-bad-fraction", type=float, default=0.05)
    parser.add_argument("--shard-size", type=int, default=256, help="images per cache shard")
    parser.add_argument("--address", help="join an existing Ray cluster")
    parser.add_argument("--smoke-test", action="store_true", help="only the first 16 patients")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from mammo_ray import cli, importers

    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    out = Path(args.out).resolve()
    images = Path(args.images).resolve()
    if out == images or images in out.parents:
        print(
            f"error: --out {out} is inside --images {images}; prepare never writes into input folders", file=sys.stderr
        )
        return 2
    try:
        table = importers.import_source(args.source, args.csv, args.images)
        if args.smoke_test:
            keep = sorted(table["patient_id"].unique())[:16]
            table = table[table["patient_id"].isin(keep)]
        manifest.validate_manifest(table.assign(split="all"), ", ".join(args.csv), check_files=False)
    except (ValueError, manifest.ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    cli.start_ray(address=args.address)
    try:
        paths = run(
            table,
            out,
            size=tuple(args.size),
            fractions=tuple(args.split),
            seed=args.seed,
            max_bad_fraction=args.max_bad_fraction,
            shard_size=args.shard_size,
        )
    except (PrepareError, manifest.ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    counts = {role: len(pd.read_parquet(path)) for role, path in paths.items()}
    print(
        f"prepared {sum(counts.values())} images in {elapsed:.1f} s: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    for role, path in paths.items():
        print(f"  {role}: {path}")
    print(f"  report: {out / REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
