"""Best-trial export: the ``best/`` bundle and ``python -m mammo_ray.export --experiment DIR``.

Every epoch's checkpoint already holds the weights, the resolved config, that epoch's validation
predictions, the history up to it and its report (``train.py``), so export picks the best
checkpoint by the chosen metric, scores the test manifest with it when there is one, computes the
metrics with patient-level bootstrap CIs, and writes the bundle (DESIGN.md "Outputs"):
``model.safetensors, config.yaml, metrics.json, val_predictions.csv, test_predictions.csv,
thresholds.json, history.csv, MODEL_CARD.md, plots/``.

The bundle is assembled in a temporary sibling folder, gets ``bundle.json`` (each file's size and SHA-256, written
last) and is renamed into place, so a reader never sees half a bundle or one mixed with the previous, and a failed
export leaves the previous one intact. ``train --out_dir`` also holds the Ray run folder, which is carried across by
renames; a crash between the renames leaves a state that the next export into the folder completes
(:func:`recover_interrupted_export`). ``predict`` checks the files it reads against ``bundle.json``.

Every checkpoint's ``report.json`` (written last by the worker) records the size and SHA-256 of its other files.
A checkpoint whose files are not all there at their recorded size (still being uploaded, or cut short by a worker
or node that stopped) is skipped, so the best complete one is exported; a file whose content differs is refused.

A sweep run with ``--storage s3://…`` (or ``gs://…``) keeps its Train runs on the bucket: the
checkpoints are listed there, and only the files a bundle needs of the chosen one are downloaded
(not the optimiser state). The bundle itself is always written to a local folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import posixpath
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import yaml

from mammo_ray import config as config_mod
from mammo_ray import environment, io, storage

log = logging.getLogger(__name__)

TRAIN_RUNS = "train_runs"
BUNDLE_FILES = ("model.safetensors", "config.yaml", "val_predictions.csv", "history.csv")
# What export reads of a checkpoint; training_state.pt (optimiser state, often larger than the weights) is not.
CHECKPOINT_FILES = (*BUNDLE_FILES, "report.json")
# In results/<name>/ of a sweep whose Tune and Train folders are on a URI: where they are.
STORAGE_POINTER = "storage.json"
# report.json's record of the checkpoint's other files (``train._write_checkpoint``).
CHECKPOINT_RECORD = "files"


class CheckpointError(ValueError):
    """A checkpoint whose files are not the ones its worker wrote: export refuses it, naming it and the file."""


def find_checkpoints(experiment: str | Path) -> pd.DataFrame:
    """Every kept checkpoint of an experiment with its epoch report (one row per checkpoint).

    Args:
        experiment: the sweep's experiment folder, local or a URI (``s3://…/<name>``); its Train runs are
            listed in one recursive listing, which on an object store is a few paged requests.

    Raises:
        StorageError: the experiment cannot be listed (network, credentials), naming it.
    """
    runs = storage.join(experiment, TRAIN_RUNS)
    fs, root = storage.resolve(runs)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as err:
        raise storage.StorageError(f"{storage.public(runs)}: cannot list it ({err})") from err
    sizes = {info.path: info.size for info in infos if info.type == pafs.FileType.File}
    files = set(sizes)
    rows = []
    for report_path in sorted(files):
        parts = posixpath.relpath(report_path, root).split("/")  # <run>/checkpoint_*/report.json
        if len(parts) != 3 or parts[2] != "report.json" or not parts[1].startswith("checkpoint_"):
            continue
        folder = posixpath.dirname(report_path)
        if not all(f"{folder}/{name}" in files for name in BUNDLE_FILES):
            continue  # a checkpoint still being uploaded or deleted
        checkpoint = storage.join(runs, parts[0], parts[1])
        try:
            report = json.loads(storage.read_text(storage.join(checkpoint, "report.json")))
        except (OSError, json.JSONDecodeError) as err:  # deleted since the listing (num_to_keep), or unreadable
            log.warning("skipping unreadable checkpoint report %s: %s", storage.public(checkpoint), err)
            continue
        recorded = report.pop(CHECKPOINT_RECORD, None)
        short = _short_file(recorded, folder, sizes)
        if short:
            log.warning(
                "skipping checkpoint %s: %s (still being uploaded, or cut short by a worker or node that stopped); "
                "the best complete checkpoint is exported instead",
                storage.public(checkpoint),
                short,
            )
            continue
        rows.append({"checkpoint": str(checkpoint), "run": parts[0], **report})
    return pd.DataFrame(rows)


def _short_file(recorded: Any, folder: str, sizes: dict[str, int]) -> str | None:
    """The first file of a checkpoint's record that the listing lacks or holds at another size, in words.

    A checkpoint whose ``report.json`` has no record (written before mammo_ray recorded its files) passes: it is
    judged by its files being present, as before.
    """
    if not isinstance(recorded, dict):
        return None
    for name, expected in recorded.items():
        size = sizes.get(f"{folder}/{name}")
        if size is None:
            return f"{name} is missing"
        if isinstance(expected, dict) and size != expected.get("size"):
            return f"{name} has {size} of the {expected.get('size')} bytes written"
    return None


def best_checkpoint(experiment: str | Path, metric: str, mode: str, *, table: pd.DataFrame | None = None) -> Path | str:
    """The best checkpoint across all trials by ``metric`` (the best trial's best epoch).

    ``table``: :func:`find_checkpoints` of the experiment, when the caller has listed it already (each listing
    reads every checkpoint's report, one request each on an object store).

    Returns:
        The checkpoint folder: a ``Path`` for a local experiment, a URI string for one on an object store.

    Raises:
        FileNotFoundError: no checkpoint, or none with a finite value of the metric.
        StorageError: the experiment cannot be listed.
    """
    shown = storage.public(experiment)
    table = find_checkpoints(experiment) if table is None else table
    if table.empty:
        raise FileNotFoundError(f"{shown}: no finished checkpoints under {TRAIN_RUNS}/")
    if metric not in table.columns:
        known = ", ".join(sorted(c for c in table.columns if c not in ("checkpoint", "run")))
        raise ValueError(f"{shown}: no metric {metric!r} in the checkpoint reports; known: {known}")
    values = pd.to_numeric(table[metric], errors="coerce")
    table = table[np.isfinite(values)]
    if table.empty:
        raise FileNotFoundError(f"{shown}: no checkpoint has a finite {metric}")
    index = values.loc[table.index].idxmax() if mode == "max" else values.loc[table.index].idxmin()
    location = table.at[index, "checkpoint"]
    return location if storage.is_uri(location) else Path(location)


def trial_epochs(experiment: str | Path, *, table: pd.DataFrame | None = None) -> int:
    """Epochs evaluated across the sweep's runs, the candidates the best checkpoint was chosen from: each run's
    latest kept checkpoint (Ray always keeps it) gives its epoch count."""
    table = find_checkpoints(experiment) if table is None else table
    if table.empty or "epoch" not in table:
        return 0
    return int(pd.to_numeric(table["epoch"], errors="coerce").groupby(table["run"]).max().fillna(0).sum())


def last_checkpoint(experiment: str | Path, checkpoint: str | Path, *, table: pd.DataFrame | None = None) -> Path | str:
    """The latest kept checkpoint of ``checkpoint``'s run, whose ``history.csv`` holds every epoch that ran.

    Ray keeps the latest checkpoint beside the best ``checkpoints_to_keep``; a bundle of the best epoch takes its
    curves from there, so that they show what came after the selected epoch (the demo's trial ran 8 epochs and
    its curves stopped at the selected second). Returns ``checkpoint`` itself when no later one is kept.
    """
    table = find_checkpoints(experiment) if table is None else table
    run = storage.name(storage.parent(str(checkpoint)))
    mine = table[table["run"] == run] if "run" in table else table
    epochs = pd.to_numeric(mine.get("epoch", pd.Series(dtype=float)), errors="coerce").dropna()
    if epochs.empty:
        return checkpoint
    location = mine.at[epochs.idxmax(), "checkpoint"]
    return location if storage.is_uri(location) else Path(location)


@contextlib.contextmanager
def local_checkpoint(checkpoint: str | Path) -> Iterator[Path]:
    """The checkpoint as a local folder: itself, or a temporary copy of the files export reads.

    The copy goes to the system's temporary folder and is removed afterwards.

    Raises:
        StorageError: a file of the checkpoint cannot be downloaded, naming it.
    """
    if not storage.is_uri(str(checkpoint)):
        check_checkpoint(Path(checkpoint), str(checkpoint))
        yield Path(checkpoint)
        return
    with tempfile.TemporaryDirectory(prefix="mammo-ray-checkpoint-") as tmp:
        local = storage.download(str(checkpoint), CHECKPOINT_FILES, Path(tmp) / storage.name(str(checkpoint)))
        check_checkpoint(local, storage.public(checkpoint))
        yield local


def check_checkpoint(folder: Path, shown: str) -> None:
    """Check the files export reads of a checkpoint against the size and SHA-256 its ``report.json`` records.

    A checkpoint written before mammo_ray recorded its files is used as found, with a warning.

    Raises:
        CheckpointError: naming the checkpoint (``shown``) and the first file that does not match.
    """
    try:
        recorded = json.loads((folder / "report.json").read_text()).get(CHECKPOINT_RECORD)
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{shown}: report.json cannot be read ({err})") from err
    if recorded is None:
        log.warning(
            "%s: report.json records no file sizes or checksums (a checkpoint written before mammo_ray recorded "
            "them); its files are used as found",
            shown,
        )
        return
    for name in CHECKPOINT_FILES:
        if name == "report.json":
            continue
        expected = recorded.get(name) if isinstance(recorded, dict) else None
        problem = "is not in report.json's record" if expected is None else io.record_mismatch(folder / name, expected)
        if problem:
            raise CheckpointError(
                f"checkpoint {shown}: {name} {problem}; the checkpoint is incomplete or damaged (a worker or node "
                "that stopped while writing or uploading it), and export refuses it. Export another one (--metric), "
                "or move this checkpoint folder away and export again"
            )


def _thresholds(val: pd.DataFrame, default: float, epoch: Any = None) -> dict[str, Any]:
    from mammo_ray import metrics

    table: dict[str, Any] = metrics.thresholds_table(val)
    labels = pd.to_numeric(val["label"], errors="coerce")
    note = (
        "youden and spec* are fitted on these validation predictions, so their validation sensitivity and "
        "specificity are optimistic; 0.3 is the reference script's fixed threshold, not fitted"
    )
    table["default"] = "0.3" if math.isclose(default, 0.3) else str(default)
    if table["default"] not in table:
        table[table["default"]] = metrics.thresholds_table(val, threshold=default)[metrics.threshold_key(default)]
        note += f"; the default, {table['default']}, is the bundle's train.threshold, not fitted either"
    table["provenance"] = {
        "fitted_on": "validation",
        "n_images": len(val),
        "n_positive": int((labels == 1).sum()),
        "epoch": epoch,
        "note": note,
    }
    return table


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    cfg: config_mod.Config | None = None,
    frames: dict[str, pd.DataFrame] | None = None,
    *,
    reference_files: bool = False,
    bootstrap: int = 1000,
    screening_prevalence: float | None = None,
    sweep_info: dict | None = None,
    history_from: str | Path | None = None,
) -> Path:
    """Write one checkpoint's bundle (a local folder or a URI) into the local ``out_dir``, replaced atomically.

    ``history_from``: a later checkpoint of the same run (local or a URI) whose ``history.csv`` (every epoch that
    ran) goes into the bundle instead of the selected checkpoint's (the epochs up to it): ``train`` passes its last
    one, ``tune`` and ``export`` the run's latest kept one (:func:`last_checkpoint`).
    """
    with local_checkpoint(checkpoint_dir) as local:
        return _write_bundle(
            local,
            Path(out_dir),
            storage.public(checkpoint_dir),
            frames,
            reference_files=reference_files,
            bootstrap=bootstrap,
            screening_prevalence=screening_prevalence,
            sweep_info=sweep_info,
            history_from=None if str(history_from) == str(checkpoint_dir) else history_from,
        )


PREPROCESSING = "preprocessing.json"


def preprocessing_record(cfg: config_mod.Config, frames: dict | None) -> dict[str, Any]:
    """How the model's training images were made, for ``predict`` to make raw files the same way.

    From a pixel cache, an image was preprocessed at the cache's size (with or without the reduced JPEG 2000
    decode) and then resized to ``data.image_size``; decoded on the fly, it was preprocessed at ``image_size``.
    Preprocessing a raw file straight at ``image_size`` picks a coarser JPEG 2000 level and resizes once, which
    differs from the training images (mean 0.002 of the range at 512×256 from a 1024×512 cache, up to 0.06 at the
    99th percentile, on MG1 of the test data).
    """
    from mammo_ray import cache, manifest

    train = (frames or {}).get("train")
    if train is not None and cfg.data.use_cache and manifest.has_cache(train) and len(train):
        folders = train["cache_file"].astype(str).map(lambda f: str(storage.parent(f)))
        caches = []
        for _, rows in train.groupby(folders, sort=False):
            settings = cache.settings_of(str(rows["cache_file"].iloc[0])) or {}
            size = settings.get("size") or [int(rows["cache_height"].iloc[0]), int(rows["cache_width"].iloc[0])]
            reduced = bool(settings.get("reduced_decode", True))
            caches.append({"size": [int(v) for v in size], "reduced_decode": reduced, "images": len(rows)})
        distinct = {(tuple(c["size"]), c["reduced_decode"]) for c in caches}
        main = max(caches, key=lambda c: c["images"])
        record = {
            "size": main["size"],
            "reduced_decode": main["reduced_decode"],
            "source": "the training manifest's pixel cache",
        }
        if len(distinct) > 1:
            # Manifests prepared at different sizes or decode settings, joined: predict can follow only one.
            log.warning(
                "the training images come from caches made differently (%s); predict makes raw files as the largest "
                "share was made (%s)",
                "; ".join(f"{c['size']}, reduced decode {c['reduced_decode']}: {c['images']} images" for c in caches),
                main["size"],
            )
            record["caches"] = caches
        return record
    if train is None:
        source = "data.image_size (the training manifest was not at hand when the bundle was written)"
    else:
        source = "data.image_size (training decoded its files on the fly)"
    return {"size": [int(v) for v in cfg.data.image_size], "reduced_decode": True, "source": source}


def _copy_history(checkpoint_dir: Path, history_from: str | Path | None, target: Path, epoch: Any) -> None:
    """The run's history into the bundle: the later checkpoint's when it can be read and reaches the selected
    epoch, else the selected checkpoint's own (the epochs up to it)."""
    if history_from is not None and str(history_from) != str(checkpoint_dir):
        try:
            text = storage.read_text(storage.join(history_from, "history.csv"))
            epochs = pd.read_csv(StringIO(text))["epoch"]
            if epoch is None or (epochs == epoch).any():
                target.write_text(text)
                return
        except (OSError, KeyError, ValueError, pd.errors.ParserError) as err:  # removed since (num_to_keep), damaged
            log.warning(
                "history of %s not read (%s); the bundle's stops at its epoch", storage.public(history_from), err
            )
    shutil.copy2(checkpoint_dir / "history.csv", target)


def _write_bundle(
    checkpoint_dir: Path,
    out_dir: Path,
    recorded: str,
    frames: dict[str, pd.DataFrame] | None,
    *,
    reference_files: bool,
    bootstrap: int,
    sweep_info: dict | None,
    screening_prevalence: float | None = None,
    history_from: str | Path | None = None,
) -> Path:
    from mammo_ray import metrics, plots, predict

    trial_cfg = config_mod.load(checkpoint_dir / "config.yaml")
    if frames and frames.get("test") is not None and trial_cfg.data.use_cache:
        from mammo_ray import cli, manifest

        manifest.check_cache_size(
            frames["test"],
            trial_cfg.data.image_size,
            storage.public(frames["test"].attrs.get("path") or "the test manifest"),
            cli.model_size_remedy(trial_cfg.data.image_size, "pass its test manifest with --test"),
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_export(out_dir)  # tune writes best/ without check_bundle_folder
    staging = io.staging_dir(out_dir.parent, prefix=f".{out_dir.name}{STAGING_MARK}")
    try:
        for name in ("model.safetensors", "config.yaml"):
            shutil.copy2(checkpoint_dir / name, staging / name)
        report = json.loads((checkpoint_dir / "report.json").read_text())
        preprocessing = preprocessing_record(trial_cfg, frames)
        io.atomic_write_json(staging / PREPROCESSING, preprocessing)
        _copy_history(checkpoint_dir, history_from, staging / "history.csv", report.get("epoch"))
        val = pd.read_csv(
            checkpoint_dir / "val_predictions.csv", dtype={c: str for c in predict.PREDICTION_COLUMNS[:6]}
        )
        val = val[[c for c in val.columns if c != "logit"]]
        io.atomic_write_csv(staging / "val_predictions.csv", val[list(predict.PREDICTION_COLUMNS)])
        # At the bundle's own decision threshold (train.threshold, predict's default), and at the reference's 0.3.
        threshold = trial_cfg.train.threshold
        scoring = {"bootstrap": bootstrap, "seed": trial_cfg.train.seed, "threshold": threshold}
        if screening_prevalence is not None:
            scoring["screening_prevalence"] = screening_prevalence
        results = {"val": metrics.compute_metrics(val, **scoring)}
        cuts = metrics.all_operating_points(
            val
        )  # the validation's, per image and per exam, applied to test as they are
        test = None
        if frames and frames.get("test") is not None:
            net, _, _ = predict.load_bundle(staging, check=False)  # its record is written last
            test, failures = predict.predict_frame(
                net,
                frames["test"],
                image_size=tuple(trial_cfg.data.image_size),
                use_cache=trial_cfg.data.use_cache,
                mc_samples=trial_cfg.train.mc_dropout_samples,
                tta=trial_cfg.train.tta,
                preprocessing=preprocessing,
            )
            if not failures.empty:
                io.atomic_write_csv(staging / "test_failures.csv", failures)
            io.atomic_write_csv(staging / "test_predictions.csv", test[list(predict.PREDICTION_COLUMNS)])
            results["test"] = metrics.compute_metrics(test, cuts=cuts, **scoring)
            # Validation needs no such count: a validation image that cannot be read stops the trial.
            results["test"].update(failure_counts(frames["test"], failures))
            if results["test"]["n_failed"]:
                log.warning(
                    "%d of %d test images (%d positive) could not be read and are left out of the test metrics; "
                    "see test_failures.csv",
                    results["test"]["n_failed"],
                    len(frames["test"]),
                    results["test"]["n_failed_positive"],
                )
        results["selected"] = {
            "checkpoint": recorded,
            "epoch": report.get("epoch"),
            "report": {k: v for k, v in report.items() if isinstance(v, int | float)},
            "decision_threshold": threshold,
            **(sweep_info or {}),
        }
        io.atomic_write_json(staging / "metrics.json", _json_ready(results))
        io.atomic_write_json(
            staging / "thresholds.json", _json_ready(_thresholds(val, trial_cfg.train.threshold, report.get("epoch")))
        )
        history = pd.read_csv(staging / "history.csv")
        # The ROC is per image: the points fitted on exams would sit on it at image figures under an exam name.
        image_cuts = {name: cut for name, cut in cuts.items() if not name.startswith("exam_")}
        plots.plot_all_bundle(
            val,
            history,
            staging / "plots",
            threshold=trial_cfg.train.threshold,
            selected_epoch=report.get("epoch"),
            cuts=image_cuts,
        )
        if test is not None and not test.empty:
            plots.plot_test(test, staging / "plots", threshold=trial_cfg.train.threshold, cuts=image_cuts)
        (staging / "MODEL_CARD.md").write_text(model_card(trial_cfg, results, frames, report))
        if reference_files:
            write_reference_files(staging, trial_cfg.name, val, results["val"])
        write_bundle_record(staging)
        _swap_into_place(staging, out_dir)
    except BaseException:
        _discard_staging(staging, out_dir)
        raise
    return out_dir


def write_bundle_record(folder: Path) -> None:
    """``bundle.json``: the size and SHA-256 of every file of the bundle in ``folder``, written last and atomically,
    so that its presence says the bundle is complete and ``predict`` can tell its files from others'."""
    from mammo_ray import predict

    files = {
        path.relative_to(folder).as_posix(): io.file_record(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != predict.BUNDLE_MANIFEST
    }
    io.atomic_write_json(folder / predict.BUNDLE_MANIFEST, {"format": "mammo_ray bundle", "version": 1, "files": files})


def failure_counts(manifest_frame: pd.DataFrame, failures: pd.DataFrame) -> dict[str, int]:
    """How many of a split's images could not be read, and how many of those were positive: they are missing from
    its metrics, and decode failures can depend on the vendor or compression, and so on the label (STARD's flow of
    excluded cases)."""
    failed = manifest_frame[manifest_frame["image_id"].isin(failures["image_id"])]
    labels = pd.to_numeric(failed["label"], errors="coerce") if "label" in failed else pd.Series(dtype=float)
    return {"n_failed": len(failed), "n_failed_positive": int((labels == 1).sum())}


# Sibling folders of a bundle ``<name>``: ``.<name>.staging-XXXXXXXX`` while export assembles it, and
# ``.<name>.old-<ns>`` for the previous bundle while the new one is renamed into place.
STAGING_MARK = ".staging-"
OLD_MARK = ".old-"


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace the bundle in ``out_dir`` by the complete one in ``staging`` (with its ``bundle.json``); the items of
    ``out_dir`` that are not a bundle's (train's ``ray/`` run folder) are kept.

    ``out_dir`` has passed :func:`check_bundle_folder`. A file of an earlier bundle that this one does not write
    (``test_predictions.csv`` from an export with ``--test``) goes: it described another model. Four steps, each a
    rename or a removal, so that a reader of ``out_dir`` sees the old bundle or the new one, never a mix (replacing
    the files one by one, as before, left the new weights beside the old thresholds when it was cut short):

    1. the items to keep move from ``out_dir`` into ``staging``;
    2. ``out_dir`` moves aside to ``.<name>.old-<ns>``;
    3. ``staging`` becomes ``out_dir``;
    4. the old folder is removed.

    An error in steps 1–3 is undone before it is raised. A crash leaves ``staging`` complete, with what step 1 moved:
    :func:`recover_interrupted_export` finishes the swap the next time anything exports into ``out_dir``.
    """
    carried = [item for item in out_dir.iterdir() if not _is_bundle_item(item.name)] if out_dir.exists() else []
    moved: list[str] = []
    old = None
    try:
        for item in carried:
            item.replace(staging / item.name)
            moved.append(item.name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}{OLD_MARK}{time.time_ns()}")
            out_dir.replace(old)
        staging.replace(out_dir)
    except BaseException:
        try:
            if old is not None and not out_dir.exists():
                old.replace(out_dir)
            for name in moved:
                (staging / name).replace(out_dir / name)
        except OSError as err:  # staging keeps what it holds, and recover_interrupted_export finishes the swap
            log.error(
                "could not undo the interrupted replacement of %s (%s); %s holds its new bundle", out_dir, err, staging
            )
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _discard_staging(staging: Path, out_dir: Path) -> None:
    """Remove a staging folder after a failed export, unless it holds items of ``out_dir`` that an undo could not
    put back (they are the user's run, and :func:`recover_interrupted_export` puts them in place)."""
    if not staging.is_dir():
        return
    kept = sorted(item.name for item in staging.iterdir() if not _is_bundle_item(item.name))
    if kept:
        log.error("%s holds %s of %s; the next export or train into %s puts it back", staging, kept, out_dir, out_dir)
        return
    shutil.rmtree(staging, ignore_errors=True)


def interrupted_exports(out_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """What exports into ``out_dir`` that were cut short left beside it: complete staged bundles (with their
    ``bundle.json``), newest first, and previous bundles moved aside, newest first."""
    import re

    from mammo_ray import predict

    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return [], []
    name = re.escape(out_dir.name)
    staging = re.compile(rf"\.{name}{re.escape(STAGING_MARK)}[A-Za-z0-9_]+")
    aside = re.compile(rf"\.{name}{re.escape(OLD_MARK)}(\d+)")
    staged, old = [], []
    for item in out_dir.parent.iterdir():
        if not item.is_dir() or item.is_symlink():
            continue
        if staging.fullmatch(item.name) and (item / predict.BUNDLE_MANIFEST).is_file():
            staged.append(item)
        elif aside.fullmatch(item.name):
            old.append(item)
    staged.sort(key=lambda item: item.stat().st_mtime_ns, reverse=True)
    old.sort(key=lambda item: int(aside.fullmatch(item.name).group(1)), reverse=True)
    return staged, old


def recover_interrupted_export(out_dir: str | Path) -> None:
    """Finish, or undo, an export into ``out_dir`` that a crash cut short between the renames of
    :func:`_swap_into_place`, so that ``out_dir`` holds one whole bundle and every item it kept (``ray/``).

    * A complete staged bundle that holds ``out_dir``'s carried items (step 1 done), or any complete staged bundle
      when ``out_dir`` is gone (step 2 done): the swap is finished.
    * ``out_dir`` gone and no staged bundle: the previous bundle, moved aside, comes back.
    * A previous bundle moved aside beside an ``out_dir`` in place (step 3 done): removed.

    Exports into one folder must not run at the same time: one would finish the other's swap.

    Raises:
        ValueError: ``out_dir`` and the staged bundle both hold a kept item (``ray/``), which only a person can merge.
    """
    out_dir = Path(out_dir)
    staged, old = interrupted_exports(out_dir)
    carrying = [item for item in staged if any(not _is_bundle_item(p.name) for p in item.iterdir())]
    finish = carrying[0] if carrying else (staged[0] if staged and not out_dir.exists() else None)
    if finish is not None:
        both = [p.name for p in finish.iterdir() if not _is_bundle_item(p.name) and (out_dir / p.name).exists()]
        if both:
            raise ValueError(
                f"an export into {out_dir} was interrupted, and both it and {finish} (its complete new bundle) hold "
                f"{', '.join(both)}; move one of them away, then run again"
            )
        log.warning("an export into %s was interrupted; putting its complete bundle %s in place", out_dir, finish)
        _swap_into_place(finish, out_dir)
    elif old and not out_dir.exists():
        log.warning("an export into %s was interrupted; putting the previous bundle %s back", out_dir, old[0])
        old[0].replace(out_dir)
    if out_dir.exists():
        for item in interrupted_exports(out_dir)[1]:
            if any(not _is_bundle_item(p.name) for p in item.iterdir()):
                log.warning("%s holds more than a bundle; left in place", item)
                continue
            shutil.rmtree(item, ignore_errors=True)


# What a bundle folder holds (README, "What a bundle looks like"), and train's Ray run folder beside it.
BUNDLE_ITEMS = (
    "model.safetensors",
    "config.yaml",
    "history.csv",
    "metrics.json",
    "thresholds.json",
    "preprocessing.json",
    "val_predictions.csv",
    "test_predictions.csv",
    "test_failures.csv",
    "MODEL_CARD.md",
    "plots",
    "bundle.json",
)
TRAIN_RUN_FOLDER = "ray"


def _is_bundle_item(name: str) -> bool:
    reference = (name.startswith("results_last_") and name.endswith(".tsv")) or name.endswith("_metrics.csv")
    return name in BUNDLE_ITEMS or reference


def _is_train_out_dir(folder: Path) -> bool:
    """A ``train --out_dir``: its Train run in ``ray/`` beside the bundle, and no sweep's ``train_runs/``."""
    return (folder / TRAIN_RUN_FOLDER).is_dir() and not (folder / TRAIN_RUNS).exists()


def check_bundle_folder(out_dir: str | Path) -> None:
    """Refuse, before anything is computed, an output folder whose files an export would replace or delete.

    A bundle is written into a new or empty folder, or over an earlier bundle (with ``model.safetensors``) or a
    ``train --out_dir`` (with its ``ray/`` run folder). Anything else (a sweep's own folder, whose ``config.yaml``
    holds the search space, or a folder of the user's) is refused: an export replaced its ``config.yaml`` and
    ``plots/`` before. An earlier export into it that a crash cut short is finished first
    (:func:`recover_interrupted_export`), so that train's ``ray/`` is back before a new run writes there.

    Raises:
        ValueError: naming the folder and the first items that are not a bundle's.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a bundle folder")
    recover_interrupted_export(out_dir)
    if not out_dir.exists():
        return
    names = sorted(p.name for p in out_dir.iterdir())
    foreign = [name for name in names if not _is_bundle_item(name) and name != TRAIN_RUN_FOLDER]
    ours = "model.safetensors" in names or TRAIN_RUN_FOLDER in names
    if names and (foreign or not ours):
        shown = ", ".join((foreign or names)[:5])
        raise ValueError(
            f"{out_dir} is not empty and holds no bundle ({shown}); the bundle would replace or delete files in it. "
            "Name a new or empty folder, or an earlier bundle"
        )


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def write_reference_files(out_dir: Path, experiment: str, val: pd.DataFrame, val_metrics: dict) -> None:
    """The reference script's ``results_last_{exp}.tsv`` and ``{exp}_metrics.csv``."""
    threshold = 0.3
    uncertainty = val["aleatoric"] if val["aleatoric"].notna().any() else val["epistemic"]
    table = pd.DataFrame(
        {
            "true_labels": val["label"].astype(int),
            "predicted_labels": (val["prob"] >= threshold).astype(int),
            "logits": np.log(np.clip(val["prob"], 1e-12, 1)) - np.log(np.clip(1 - val["prob"], 1e-12, 1)),
            "score": val["prob"],
            "uncertainty": uncertainty,
            "dataset": val["dataset"],
        }
    )
    io.atomic_write(out_dir / f"results_last_{experiment}.tsv", lambda tmp: table.to_csv(tmp, sep="\t", index=False))
    rows = [{"dataset": "ALL", **_flat(val_metrics)}]
    for name, values in (val_metrics.get("by_dataset") or {}).items():
        rows.append({"dataset": name, **_flat(values)})
    io.atomic_write_csv(out_dir / f"{experiment}_metrics.csv", pd.DataFrame(rows))


def _flat(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        if key == "by_dataset" or key.endswith("_reason"):
            continue
        if isinstance(value, list | tuple):
            out[f"{key}_low"], out[f"{key}_high"] = (value + [None, None])[:2] if isinstance(value, list) else value
        else:
            out[key] = value
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(values: dict, key: str, show: Callable[[Any], str] = _fmt) -> str:
    """``key``'s value with its 95% CI where it has one, written by ``show``."""
    from mammo_ray import metrics

    ci = values.get(f"{key}_ci95")
    if not ci or ci[0] is None:
        return show(values.get(key))
    # Clopper-Pearson on patients, not the bootstrap (ECE's basic bootstrap interval is a bootstrap one: no mark).
    exact = "†" if values.get(f"{key}_ci95_method") == metrics.CLOPPER_PEARSON else ""
    return f"{show(values.get(key))} ({show(ci[0])}–{show(ci[1])}){exact}"


# augment.VERTICAL_FLIP_VIEWS, written out: export does not import albumentations.
_AUGMENTATION_TEXT = (
    "on (same transforms for both classes; vertical flip only for CC, XCCL, XCCM and FB views, never for MLO, "
    "lateral or unknown views, where it would put the pectoral muscle at the bottom)"
)


def model_card(cfg: config_mod.Config, results: dict, frames: dict | None, report: dict) -> str:
    """MODEL_CARD.md: data, preprocessing, metrics with CIs, per-dataset tables, calibration, use and limits."""
    from mammo_ray import metrics

    decision = metrics.threshold_key(cfg.train.threshold)  # the bundle's decision threshold names the columns
    lines = [f"# Model card: {cfg.name}", ""]
    lines += [
        "## Model",
        f"- Backbone: `{cfg.model.backbone}` (timm"
        + (
            ""
            if (cfg.model.stem, cfg.model.norm) == ("patchify", "layer")
            else f"; {cfg.model.stem} stem, {cfg.model.norm} norm, not the published ConvNeXt"
        )
        + f"), {report.get('trainable_params', 'n/a')} trainable parameters, "
        f"first {cfg.model.freeze_units} unit(s) frozen"
        + (" (random weights: they stay random)" if cfg.model.freeze_units and not cfg.model.pretrained else "")
        + f"; head dropout {cfg.model.dropout:.3g}; "
        f"{'attenuation head (μ, log σ²)' if cfg.model.attenuation else 'one logit'}.",
        f"- Pretrained weights: {cfg.model.pretrained or 'none (random initialisation)'}.",
        f"- Training: {cfg.train.optimizer}, lr {cfg.train.lr:.3g}, weight decay {cfg.train.weight_decay:.3g}, "
        f"{cfg.train.schedule} schedule, loss {cfg.train.loss}, sampler {cfg.train.sampler}"
        f"{f' (positive fraction {cfg.train.positive_fraction:.2f})' if cfg.train.sampler == 'weighted' else ''}, "
        f"batch {cfg.train.batch_size} × {cfg.resources.num_workers} worker(s); selected epoch {report.get('epoch')} "
        f"of {cfg.train.epochs}"
        + (
            f" (an epoch is {cfg.train.epoch_length} sampled training images, not a pass over the training set)."
            if cfg.train.epoch_length
            else "."
        ),
        f"- Trained on: {environment.summary(report.get('environment') or {})}. The seed (train.seed "
        f"{cfg.train.seed}) repeats a run only on the same kind of hardware and the same library versions: CPU and "
        "GPU kernels round differently on different instruction sets and devices.",
        "",
        "## Data",
    ]
    if frames:
        lines += [
            "| split | images | positive images (prevalence) | patients (with cancer) | exams | datasets | vendors |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [_cohort_row(role, frame) for role, frame in frames.items() if frame is not None]
        lines.append(
            "\nPatients and exams are counted within their data set. The bootstrap resamples patients, so the patients "
            "with cancer, not the positive images, bound how precise the figures below can be."
        )
    else:
        lines.append("Split counts are in metrics.json (`n_images`, `n_positive`).")
    lines += [
        "",
        "## Preprocessing",
        f"DICOM modality LUT, then VOI LUT or window (percentile fallback), MONOCHROME1 inverted, cropped to the "
        f"breast, flipped so the chest wall is on the left, resized keeping the aspect ratio and padded to "
        f"{cfg.data.image_size[0]}×{cfg.data.image_size[1]}; 16-bit until normalisation. "
        f"Training augmentation: {_AUGMENTATION_TEXT if cfg.train.augment else 'off'}; "
        "validation and test images are never augmented.",
        "",
        "## Metrics",
        f"95% CIs from a patient-level percentile bootstrap ({_bootstrap_text(results)}patients resampled with all "
        "their images). Patients are counted per class: an AUC's CI is left out where fewer than 10 patients have a "
        "positive image or fewer than 10 a negative one, where more than 5% of the resamples held one class only, or "
        "where the resamples' percentiles coincide (a zero-width interval would read as certainty). A sensitivity or "
        "specificity at 0 or 1, where every resample gives the same value, or from fewer than 10 patients of its "
        "class gets Clopper-Pearson's exact interval instead, marked †, with each patient of the class (with a "
        "positive image for sensitivity, a negative one for specificity) counted once: conservative, as if a "
        "patient's images were fully correlated. ROC-AUC, PR-AUC, sensitivity and specificity in this table are per "
        "image, each image a case. The breast AUC scores each breast (one side in one exam) by the mean of its images' "
        "probabilities, and a breast is positive if any of its images is. Per exam, as a recall is decided, see the "
        "operating points below: an exam is recalled when any of its images reaches the threshold, and is positive "
        "when any of its images is. ECE uses 10 equal-width bins. ECE and Brier get CIs from the same patient "
        "resamples, left out, as an AUC's, where fewer than 10 patients have a positive or a negative image. Binned "
        "ECE is biased upwards (never below 0, and above 0 for a calibrated model), so the ECE shown is the usual "
        "plug-in figure, comparable with other reports, but its CI is the basic bootstrap's (2·ECE minus the "
        "resamples' upper and lower percentiles, at least 0): an interval for the calibration error itself, "
        "corrected for the bias the resamples show, which may lie below the ECE shown. The correction is partial: "
        "in simulated data sets of 200 women it held a calibrated model's 0 in 58 of 100, so a CI above 0 is weak "
        "evidence of miscalibration on its own. Brier, a mean of per-image terms and so unbiased, keeps the percentile CI. "
        "The spec0.90 point is the validation's threshold: "
        "on test and on each data set it is applied as it stands, so the specificity it reaches is shown beside the "
        "sensitivity." + _selection_text(results) + _failures_text(results),
        "",
        f"| split | images (pos.) | image ROC-AUC | image PR-AUC | breast AUC | image sens@{decision} | image "
        f"spec@{decision} | image sens / spec at the spec0.90 point | ECE | Brier |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split in ("val", "test"):
        values = results.get(split)
        if not values:
            continue
        lines.append(_metric_row(split, values, decision))
        by_dataset = values.get("by_dataset") or {}
        if len(by_dataset) > 1:  # one data set's row would repeat the split's
            lines += [_metric_row(f"{split} · {name}", sub, decision) for name, sub in by_dataset.items()]
    lines += _chance_lines(results)
    scopes = [
        (f"{split} · {name}" if name else split, values)
        for split in ("val", "test")
        for name, values in [
            ("", results.get(split) or {}),
            *((results.get(split) or {}).get("by_dataset") or {}).items(),
        ]
    ]
    undefined = [
        f"- {scope}: `{key[:-7]}`: {value}"
        for scope, values in scopes
        for key, value in values.items()
        if key.endswith("_reason")
    ]
    if undefined:
        lines += ["", "Undefined metrics:", *undefined]
    val = results["val"]
    lines += [
        "",
        "## Calibration and operating points",
        f"ECE {_ci(val, 'ece')}, Brier {_ci(val, 'brier')} on validation (see plots/reliability.png, whose "
        "per-bin 95% Wilson intervals count a woman's images in a bin as correlated: the bin's images divided by the "
        "design effect of their patients, with the t quantile on the bin's patients - 1 degrees of freedom; a bin of "
        "one patient gets none). "
        "thresholds.json lists the thresholds at 0.3 (the reference's), "
        + (
            ""
            if decision == "0.3"
            else f"at {decision} (train.threshold: the bundle's decision threshold, predict's default, not fitted; "
            f"the table above and metrics.json `sensitivity@{decision}` give it on each split), "
        )
        + "the Youden point and specificity 0.90 "
        "and 0.987 (a high-specificity screening point, near what double reading reaches in European programmes; the "
        "value is this project's choice, not taken from one study), fitted on images, and the same two "
        "specificities fitted on exams (exam_spec0.90, exam_spec0.987: an exam is recalled when any of its images "
        "reaches the threshold, as a screening programme sets its recall rate), each with its validation "
        "sensitivity and specificity; they were "
        "chosen on validation data and are optimistic there. Test figures at the Youden and fixed-specificity points "
        "apply these validation thresholds (metrics.json `threshold@…`, `specificity@…`); they are not re-fitted on "
        "the test labels. 0.3 is the reference script's fixed threshold, not fitted on any data. The table gives "
        "each point's sensitivity and specificity per image and per exam (an exam is recalled when any of its images "
        "reaches the threshold)." + _calibration_caveat(cfg),
        *_operating_points_table(results, cfg.train.threshold),
        *_screening_table(results, cfg.train.threshold),
        "",
        "## Uncertainty",
        "`aleatoric` is σ² of the attenuation head (logit units) when the model has one; `epistemic` is the "
        "variance of the probability over MC-dropout passes and/or test-time flips when configured "
        f"(here: {cfg.train.mc_dropout_samples} MC pass(es), TTA {'on' if cfg.train.tta else 'off'}); "
        "otherwise they are empty.",
        "",
        "## Intended use and limits",
        "- Research use only: not a medical device, not validated for clinical decisions.",
        "- Image-level scores on the data sources above; performance on other vendors, populations or "
        "screening programmes is unknown until measured.",
        "- Metrics are from the validation split used for model selection (optimistic) and, where present, a "
        f"test split{_held_out(frames)}; small positive counts give wide intervals, or none.",
        "- A model trained on the built-in synthetic data set has learned synthetic lesions only.",
        "",
    ]
    return "\n".join(lines)


def _cohort_row(role: str, frame: pd.DataFrame) -> str:
    from mammo_ray import metrics

    labels = pd.to_numeric(frame["label"], errors="coerce").fillna(0).astype(bool)
    patients = metrics.patient_key(frame)
    exams = patients.astype(str) + "/" + frame["exam_id"].astype(str) if "exam_id" in frame else None
    prevalence = f"{labels.mean():.1%}" if len(frame) else "n/a"
    datasets = ", ".join(f"{k} ({v})" for k, v in frame["dataset"].value_counts().items())
    vendors = "not recorded"
    if "manufacturer" in frame and frame["manufacturer"].notna().any():
        vendors = ", ".join(f"{k} ({v})" for k, v in frame["manufacturer"].fillna("unknown").value_counts().items())
    return (
        f"| {role} | {len(frame)} | {int(labels.sum())} ({prevalence}) | {patients.nunique()} "
        f"({patients[labels].nunique()}) | {exams.nunique() if exams is not None else 'n/a'} | {datasets} | {vendors} |"
    )


def _bootstrap_text(results: dict) -> str:
    boot = (results.get("val") or {}).get("bootstrap") or {}
    if not boot:
        return ""
    return f"{boot.get('n_resamples')} resamples, seed {boot.get('seed')}; "


def _selection_text(results: dict) -> str:
    """How the exported checkpoint was chosen: the validation figures are the maximum of several candidates."""
    selected = results.get("selected") or {}
    candidates, metric = selected.get("candidates"), selected.get("metric", "the metric")
    if not candidates or candidates < 2:
        return ""
    test = "; the test split was not used for any choice" if results.get("test") else ""
    return (
        f" The checkpoint was chosen as the best of {candidates} trial-epochs by {metric} on the validation split, "
        f"so the validation figures are optimistic, and their intervals do not account for that choice{test}."
    )


def auc_versus_chance(ci: Any) -> str:
    """What an AUC's interval says about chance, for the console and the card: one that includes 0.5 shows no
    evidence of better than chance (not that the model is at chance); one wholly below 0.5, worse than chance."""
    if not ci or ci[0] is None:
        return ""
    if ci[0] <= 0.5 <= ci[1]:
        return "includes 0.5: no evidence of better than chance"
    if ci[1] < 0.5:
        return "lies below 0.5: worse than chance on this split"
    return ""


def _chance_lines(results: dict) -> list[str]:
    lines = []
    for split, name in (("val", "validation"), ("test", "test")):
        ci = (results.get(split) or {}).get("auc_ci95")
        versus_chance = auc_versus_chance(ci)
        if versus_chance:
            lines.append(f"The {name} ROC-AUC's 95% CI ({_fmt(ci[0])}–{_fmt(ci[1])}) {versus_chance}.")
    return ["", " ".join(lines)] if lines else []


def _failures_text(results: dict) -> str:
    """What the card says of test images that could not be read: the Data table counts them, the metric rows do
    not."""
    test = results.get("test") or {}
    if "n_failed" not in test:
        return ""
    failed = test["n_failed"]
    total = failed + (test.get("n_images") or 0)
    if not failed:
        return f" All {total} test images were read."
    return (
        f" {failed} of {total} test images ({test.get('n_failed_positive', 0)} of them positive) could not be read "
        "and are left out of the test figures (test_failures.csv); the Data table counts them."
    )


# The operating points fitted on validation, as the card's tables list them: per image, then per exam.
FITTED_POINTS = ("youden", "spec0.90", "spec0.987", "exam_spec0.90", "exam_spec0.987")


def _operating_points_table(results: dict, decision: float = 0.3) -> list[str]:
    """Each operating point per split, per image and per exam: the fixed thresholds (the bundle's decision threshold
    and the reference's 0.3), then the points fitted on validation."""
    from mammo_ray import metrics

    own = metrics.threshold_key(decision)
    fixed = [(own, f"{own} (train.threshold{', reference' if own == '0.3' else ''})", decision)]
    fixed += [] if own == "0.3" else [("0.3", "0.3 (reference)", 0.3)]
    rows = []
    for split in ("val", "test"):
        values = results.get(split) or {}
        points = list(fixed)
        points += [(name, name, values.get(f"threshold@{name}")) for name in FITTED_POINTS]
        for key, label, cut in points:
            if cut is None or f"sensitivity@{key}" not in values:
                continue
            rows.append(
                f"| {split} | {label} | {_fmt(cut)} | {_ci(values, f'sensitivity@{key}')} | "
                f"{_ci(values, f'specificity@{key}')} | {_fmt(values.get(f'sensitivity_exam@{key}'))} | "
                f"{_fmt(values.get(f'specificity_exam@{key}'))} |"
            )
    if not rows:
        return []
    return [
        "",
        "| split | point | threshold | image sensitivity | image specificity | exam sensitivity | exam specificity |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def _percent(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}%}"


def _screening_table(results: dict, decision: float = 0.3) -> list[str]:
    """Each operating point's per-exam sensitivity and specificity projected to a screening population
    (``metrics.screening_projection``): on test where the bundle has one, else on validation."""
    from mammo_ray import metrics

    split = "test" if results.get("test") else "val"
    values = results.get(split) or {}
    split_name = "test" if split == "test" else "validation"
    prevalence = values.get("screening_prevalence")
    if prevalence is None:
        return []
    own = metrics.threshold_key(decision)
    keys = [own] + ([] if own == "0.3" else ["0.3"]) + list(FITTED_POINTS)
    rows = [
        f"| {key} | {_ci(values, f'sensitivity_exam@{key}')} | {_ci(values, f'specificity_exam@{key}')} | "
        f"{_ci(values, f'recall_rate_screening@{key}', _percent)} | "
        f"{_ci(values, f'cancer_detection_per_1000_screening@{key}', lambda v: _fmt(v, 2))} | "
        f"{_ci(values, f'ppv1_screening@{key}', lambda v: _percent(v, 2))} |"  # PPV1 is a few %: two decimals
        for key in keys
        if f"recall_rate_screening@{key}" in values
    ]
    if not rows:
        return []
    n_exams, n_positive = values.get("n_exams") or 0, values.get("n_positive_exams") or 0
    own_share = f"{n_positive / n_exams:.1%} of its {n_exams} exams" if n_exams else "no exams"
    sizes = values.get("images_per_exam") or {}
    pooled = ""
    if sizes:
        held = (
            f"Each of its exams holds {sizes['min']} images"
            if sizes["min"] == sizes["max"]
            else f"Its exams hold {sizes['min']}–{sizes['max']} images (median {sizes['median']:g})"
        )
        pooled = (
            f" {held}; more than a screen's four or so means a data set without exam ids, where each woman's images, "
            "all her rounds, form one exam."
        )
    return [
        "",
        f"**In a screening population.** The {split_name} split is enriched ({own_share} hold a cancer), so the share "
        "of its exams a point recalls and the positive predictive value of a recall would mislead. Below, each "
        f"point's {split_name} sensitivity and specificity per exam (patient × exam within a data set, recalled when "
        f"any image reaches the threshold) are projected to {prevalence * 1000:g} cancers per 1,000 screening exams "
        "with Bayes' rule: recall rate = se·π + (1 − sp)(1 − π), cancer detection = se·π, PPV1 = detection / recall "
        "rate (metrics.json `recall_rate_screening@…`, `cancer_detection_per_1000_screening@…`, `ppv1_screening@…`; "
        "95% CIs from the same patient resamples, each resample's exam figures projected, for the thresholds not "
        f"fitted on this split; `export --screening-prevalence` sets π).{pooled} The fixed-specificity "
        "points were set on images, so their exam specificity is lower. The projection assumes the split's cancers "
        "and negatives resemble a screening population's in all but prevalence; an enriched set often holds more "
        "conspicuous cancers and harder or easier negatives than screening (spectrum bias), and π must count the "
        "cancers its labels count (screen-detected and interval cancers within the label's follow-up window). `prob` "
        "itself stays calibrated, at best, to the split's prevalence, not to π. For comparison, the minimally "
        "acceptable ranges for a radiologist (Carney et al., 2010; ACR BI-RADS Atlas, 5th ed.): recall rate 5–12%, "
        "cancer detection at least 2.5 per 1,000, PPV1 3–8%, sensitivity at least 0.75, specificity 0.88–0.95; "
        "European guidelines accept recall rates under 7% at first and under 5% at later screens.",
        "",
        "| point | exam sensitivity | exam specificity | recall rate | cancers detected per 1,000 | PPV1 |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _calibration_caveat(cfg: config_mod.Config) -> str:
    if cfg.train.sampler == "simple":
        return ""
    share = cfg.train.positive_fraction if cfg.train.sampler == "weighted" else 0.5
    return (
        f" Training batches held about {share:.0%} positives (sampler {cfg.train.sampler}), far above a screening "
        "prevalence, so `prob` overstates the risk of cancer: read it as a ranking score, or recalibrate it on data "
        "of the intended prevalence before reading it as a probability."
    )


def _held_out(frames: dict | None) -> str:
    """What the card can say of the test split: which manifests it was checked against for shared patients."""
    if not frames or frames.get("test") is None:
        return ""
    checked = " and ".join(role for role in ("train", "valid") if frames.get(role) is not None)
    missing = " and ".join(role for role in ("train", "valid") if frames.get(role) is None)
    if not checked:
        return f" (not checked for shared patients: the {missing} manifests were not found)"
    said = f" (checked to share no patient, exam or image with {checked}"
    return said + (f"; not with {missing}, whose manifest was not found)" if missing else ")")


def _metric_row(name: str, values: dict, threshold: str = "0.3") -> str:
    return (
        f"| {name} | {values.get('n_images')} ({values.get('n_positive')}) | {_ci(values, 'auc')} | "
        f"{_ci(values, 'pr_auc')} | {_ci(values, 'auc_breast')} | {_ci(values, f'sensitivity@{threshold}')} | "
        f"{_ci(values, f'specificity@{threshold}')} | {_fmt(values.get('sensitivity@spec0.90'))} / "
        f"{_fmt(values.get('specificity@spec0.90'))} | "
        f"{_ci(values, 'ece')} | {_ci(values, 'brier')} |"
    )


def _prevalence(text: str) -> float:
    """An argparse ``type``: a share of exams strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (6 per 1,000 is 0.006), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from mammo_ray import cli

    parser = argparse.ArgumentParser(prog="mammo-ray export", description="(Re)export the best trial of a sweep.")
    parser.add_argument(
        "--experiment",
        required=True,
        help="a sweep folder, results/<name>, or the sweep on its --storage URI, e.g. s3://bucket/mammo-ray/<name>",
    )
    parser.add_argument("--metric", help="metric to choose by (default: the sweep's, e.g. val_auc)")
    parser.add_argument(
        "--mode", choices=["max", "min"], help="the metric's better direction (default: known for every metric a run "
        "reports; needed only for another report column)"
    )  # fmt: skip
    parser.add_argument("--out", help="bundle folder (default: <experiment>/best; results/<name>/best for a URI)")
    parser.add_argument(
        "--bootstrap", type=cli.int_at_least(0), default=1000, help="bootstrap resamples for the CIs (0: none)"
    )
    parser.add_argument(
        "--screening-prevalence",
        type=_prevalence,
        help="cancers per screening exam at which each operating point's recall rate, detection rate and PPV1 are "
        "projected; it must count the cancers the labels count, screen-detected and interval (default 0.006: 6 per "
        "1,000)",
    )
    tests = parser.add_mutually_exclusive_group()
    tests.add_argument("--test", help="test manifest to score (default: the sweep's)")
    tests.add_argument("--no-test", action="store_true", help="score no test manifest, not even the sweep's")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def selection_mode(metric: str, mode: str | None, sweep_cfg: config_mod.Config | None) -> str:
    """The direction in which ``metric`` is better: known for the metrics runs report (``config.SELECTION_METRICS``).

    Raises:
        ValueError: a ``mode`` that would select the worst checkpoint, or an unknown metric without a ``mode``.
    """
    better = config_mod.SELECTION_METRICS.get(metric)
    if better is None and sweep_cfg is not None and metric == sweep_cfg.search.metric:
        better = sweep_cfg.search.mode
    if better is None:
        if mode is None:
            raise ValueError(f"--metric {metric}: give --mode max or min, the direction in which {metric} is better")
        return mode
    if mode is not None and mode != better:
        raise ValueError(
            f"--mode {mode} would export the worst {metric}; {metric} is better when "
            f"{'higher' if better == 'max' else 'lower'} (leave --mode out)"
        )
    return better


def main(argv: list[str] | None = None) -> int:
    from mammo_ray import cli, manifest

    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    folder = args.experiment if storage.is_uri(args.experiment) else Path(cli.absolute_path(args.experiment))
    try:
        if not storage.is_uri(folder) and not folder.is_dir():
            raise FileNotFoundError(f"--experiment {args.experiment}: no such folder")
        experiment = experiment_location(folder)
        if not storage.is_uri(str(experiment)) and _is_train_out_dir(Path(experiment)):
            raise ValueError(
                f"--experiment {args.experiment} is a `train --out_dir`, not a sweep: its bundle was exported from its "
                "best epoch when train finished. Score other images with `predict --model` on it; for another "
                "export (another test set, --screening-prevalence), run the config as a sweep with `tune`"
            )
        sweep_cfg = _sweep_config(storage.join(folder, "config.yaml"))
        metric = args.metric or (sweep_cfg.search.metric if sweep_cfg else "val_auc")
        mode = selection_mode(metric, args.mode, sweep_cfg)
        if args.out:
            out = Path(args.out)
        elif storage.is_uri(folder):
            out = Path("results") / storage.name(folder) / "best"  # where tune's default --results puts it
        else:
            out = folder / "best"
        check_bundle_folder(out)
        checkpoints = find_checkpoints(experiment)
        checkpoint = best_checkpoint(experiment, metric, mode, table=checkpoints)
        recorded = storage.join(folder, "manifests.json")  # what the sweep actually trained on (incl. synthetic)
        swept = json.loads(storage.read_text(recorded)) if storage.is_file(recorded) else {}
        frames = sweep_manifests(swept)  # the card's data table, and the held-out check below
        test_path = None
        if not args.no_test:
            test_path = args.test or swept.get("test") or (sweep_cfg.data.test if sweep_cfg else None)
        if test_path:
            if not args.test and not storage.exists(test_path):
                raise FileNotFoundError(
                    f"the sweep's test manifest {storage.public(test_path)} (recorded in {storage.public(recorded)}) "
                    "no longer exists; pass its new place with --test, or --no-test"
                )
            frames["test"] = manifest.load_manifests({"test": test_path})["test"]
            frames["test"].attrs["path"] = test_path
            # The card calls the test split held out: a --test drawn from the training rows would report a leaked
            # figure as one.
            manifest.check_overlap(frames, refusing="to report it as a held-out test", within_dataset=True)
    except (FileNotFoundError, ValueError, config_mod.ConfigError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        export_bundle(
            checkpoint,
            out,
            frames=frames or None,
            bootstrap=args.bootstrap,
            screening_prevalence=args.screening_prevalence,
            sweep_info={"metric": metric, "candidates": trial_epochs(experiment, table=checkpoints)},
            history_from=last_checkpoint(experiment, checkpoint, table=checkpoints),
        )
    except manifest.ManifestError as err:  # a test manifest whose pixel cache is smaller than the model's input
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (storage.StorageError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {storage.public(checkpoint)} (best by {metric}, {mode}) → {out}")
    return 0


def sweep_manifests(swept: dict) -> dict[str, pd.DataFrame]:
    """The train and valid manifests a sweep recorded in its ``manifests.json``; one that has moved since is left
    out with a warning (the card then lacks its row, and ``--test`` is not checked against it)."""
    from mammo_ray import manifest

    frames = {}
    for role in ("train", "valid"):
        path = swept.get(role)
        if not path:
            continue
        if not storage.exists(path):
            log.warning("the sweep's %s manifest %s no longer exists; the card leaves it out", role, path)
            continue
        frames[role] = manifest.read_manifest(path, role)
    return frames


def experiment_location(folder: str | Path) -> str | Path:
    """Where a sweep's Train runs are: ``folder`` itself, or the URI that ``folder/storage.json`` names.

    ``tune --storage s3://…`` keeps the driver's outputs in ``results/<name>/`` and the Train runs on the
    bucket, and leaves this pointer behind so that ``export --experiment results/<name>`` finds them.
    """
    if storage.is_uri(str(folder)):
        return str(folder)
    pointer = Path(folder) / STORAGE_POINTER
    if not pointer.is_file():
        return Path(folder)
    try:
        return json.loads(pointer.read_text())["experiment"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{pointer}: not a storage pointer ({err})") from err


def _sweep_config(location: str | Path) -> config_mod.Config | None:
    """The sweep's resolved config.yaml, local or on a URI; None when the folder has none."""
    if not storage.is_uri(str(location)):
        return config_mod.load(location) if Path(location).is_file() else None
    if not storage.is_file(location):
        return None
    try:
        data = yaml.safe_load(storage.read_text(location))
    except yaml.YAMLError as err:
        raise config_mod.ConfigError(f"{storage.public(location)}: not valid YAML: {err}") from err
    return config_mod.from_dict(data or {}, source=storage.public(location))


if __name__ == "__main__":
    # The importable module's main, not this ``__main__`` copy's: Ray pickles ``__main__`` by value (see prepare.py).
    from mammo_ray import export as _module

    raise SystemExit(_module.main())
