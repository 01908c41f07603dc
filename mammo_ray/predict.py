"""Inference: scores with aleatoric and epistemic uncertainty, and the ``predict`` command.

``predict_tensor`` is the one place where a model turns images into probabilities; validation in
the worker loop, export (test predictions) and ``python -m mammo_ray.predict`` all call it.

* ``prob``: sigmoid of the logit μ; with an attenuation head the probit approximation of E[sigmoid(μ + σε)],
  the likelihood its loss trains (the mean over the stochastic passes when MC dropout or TTA is on).
* ``aleatoric``: σ² of the attenuation head (Kendall & Gal 2017), in logit units, clamped as in the loss;
  NaN without one.
* ``epistemic``: the variance of the probability over K MC-dropout passes (Gal & Ghahramani 2016;
  the deterministic pass is not one of them) and/or test-time flips; NaN when neither is configured.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from mammo_ray import io
from mammo_ray.metrics import PREDICTION_COLUMNS

log = logging.getLogger(__name__)

_META = ("image_id", "patient_id", "exam_id", "laterality", "view", "dataset")


def _enable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.train()


def _probability(output):
    """The predictive probability of a model output.

    One logit: its sigmoid. Attenuation head ``[μ, log σ²]``: the likelihood the attenuation loss trains is
    E[sigmoid(μ + σε)] with ε ~ N(0, 1) (Kendall & Gal 2017), not sigmoid(μ); its probit approximation
    sigmoid(μ / √(1 + πσ²/8)) (MacKay 1992) gives it in closed form, with σ² clamped as in the loss.
    """
    import math

    import torch

    from mammo_ray.losses import LOG_VAR_MAX, LOG_VAR_MIN, split_output

    logit, log_var = split_output(output)
    if log_var is None:
        return torch.sigmoid(logit)
    variance = torch.exp(log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX))
    return torch.sigmoid(logit / torch.sqrt(1.0 + math.pi * variance / 8.0))


def predict_tensor(model, images, *, mc_samples: int = 0, tta: bool = False, use_amp: bool = False) -> dict:
    """Score one batch. Returns numpy arrays ``logit``, ``prob``, ``aleatoric``, ``epistemic``, and ``output``.

    ``output`` and ``logit`` come from the deterministic pass (dropout off; the validation loss uses it). With
    ``mc_samples`` K > 0, ``prob`` and ``epistemic`` are the mean and variance over the K stochastic passes only
    (Gal & Ghahramani 2016 average stochastic passes; the deterministic one is not a sample), every second pass on
    the up-down flipped image when ``tta`` is on. With ``tta`` alone they are over the plain and the flipped pass.
    ``aleatoric`` is the head's clamped σ², averaged over the passes that gave ``prob``.
    """
    import torch

    from mammo_ray.losses import split_output

    was_training = model.training
    model.eval()
    device_type = images.device.type
    # Up-down flip only: images are oriented chest wall left, so a left-right flip is not a view the model was
    # trained on.
    flipped = torch.flip(images, dims=[2]) if tta else None
    with torch.no_grad(), torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_amp):
        output = model(images).float()
        logit, log_var = split_output(output)
        outputs = [output]
        if mc_samples > 0:
            _enable_dropout(model)
            outputs = [model(flipped if flipped is not None and i % 2 else images).float() for i in range(mc_samples)]
            model.eval()
        elif flipped is not None:
            outputs.append(model(flipped).float())
    model.train(was_training)
    probs = torch.stack([_probability(out) for out in outputs])
    prob = probs.mean(0)
    epistemic = probs.var(0, unbiased=False) if len(outputs) > 1 else torch.full_like(prob, float("nan"))
    if log_var is not None:
        from mammo_ray.losses import aleatoric_variance

        aleatoric = torch.stack([aleatoric_variance(out) for out in outputs]).mean(0)
    else:
        aleatoric = torch.full_like(prob, float("nan"))
    return {
        "output": output,
        "logit": logit.cpu().numpy(),
        "prob": prob.cpu().numpy(),
        "aleatoric": aleatoric.cpu().numpy(),
        "epistemic": epistemic.cpu().numpy(),
    }


def predictions_frame(batch: dict[str, np.ndarray], scored: dict) -> pd.DataFrame:
    rows = {column: np.asarray(batch[column]).astype(str) for column in _META if column in batch}
    frame = pd.DataFrame(rows)
    if "label" in batch:
        # A blank label (a manifest of unlabelled images) is -1, unknown; a cast of NaN to int is INT64_MIN.
        labels = pd.to_numeric(pd.Series(np.asarray(batch["label"])), errors="coerce").fillna(-1)
        frame["label"] = labels.astype(int).to_numpy()
    else:
        frame["label"] = -1
    for key in ("prob", "logit", "aleatoric", "epistemic"):
        frame[key] = scored[key].astype(np.float64)
    return frame


def predict_iterator(
    model,
    iterator,
    *,
    device,
    batch_size: int,
    loss_fn=None,
    mc_samples: int = 0,
    tta: bool = False,
    channels_last: bool = False,
    use_amp: bool = False,
) -> tuple[pd.DataFrame, float]:
    """Score every row of a Ray Data iterator (or dataset). Returns predictions and the summed loss."""
    import torch

    from mammo_ray import data

    frames, loss_sum = [], 0.0
    for batch in iterator.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
        images = data.to_model_input(torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        scored = predict_tensor(model, images, mc_samples=mc_samples, tta=tta, use_amp=use_amp)
        if loss_fn is not None:
            labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.float32)).to(device)
            with torch.no_grad():
                loss_sum += float(loss_fn(scored["output"], labels)) * len(labels)
        frames.append(predictions_frame(batch, scored))
    columns = [*PREDICTION_COLUMNS, "logit"]
    if not frames:
        return pd.DataFrame(columns=columns), 0.0
    return pd.concat(frames, ignore_index=True)[columns], loss_sum


def predict_frame(
    model,
    frame: pd.DataFrame,
    *,
    image_size: tuple[int, int],
    use_cache: bool = True,
    batch_size: int = 32,
    mc_samples: int = 0,
    tta: bool = False,
    device: str = "cpu",
    progress: bool = False,
    preprocessing: dict | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score manifest rows in this process (no Ray). Returns (predictions, failures with path and error).

    ``preprocessing``: the bundle's ``preprocessing.json`` (``size``, ``reduced_decode``): rows without a pixel cache
    are decoded at the training cache's size and resized, as the training images were.
    """
    import torch

    from mammo_ray import data, imaging, manifest

    use_cache = use_cache and manifest.has_cache(frame)
    decode_options = {}
    if preprocessing and preprocessing.get("size"):
        decode_options = {
            "decode_size": tuple(int(v) for v in preprocessing["size"]),
            "reduced_decode": bool(preprocessing.get("reduced_decode", True)),
        }
    model = model.to(device)
    predictions, failures = [], []
    rows = frame.reset_index(drop=True)
    iterator = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=(len(rows) + batch_size - 1) // batch_size, desc="predict", unit="batch")
    for start in iterator:
        chunk = rows.iloc[start : start + batch_size]
        good, images = [], []
        for index, row in chunk.iterrows():
            path = row.get("path")
            if not use_cache and (not isinstance(path, str) or not path.strip()):
                # A blank cell of a manifest: an error row like an unreadable file's, not a TypeError for the run. The
                # row of the file, as every manifest error numbers it (a frame built in memory: its own position).
                position = row[manifest.FILE_POSITION] if manifest.FILE_POSITION in row.index else index
                error = f"empty path (manifest {manifest.row_label(position)}, {manifest.ROW_COUNTING})"
                failures.append({"image_id": row["image_id"], "path": "", "error": error})
                continue
            try:
                batch = {k: np.array([row[k]]) for k in row.index}
                images.append(data.decode_rows(batch, image_size, use_cache, **decode_options)[0])
                good.append(index)
            except (imaging.ImageReadError, OSError, ValueError) as err:
                failures.append({"image_id": row["image_id"], "path": row.get("path", ""), "error": str(err)})
        if not good:
            continue
        tensor = torch.from_numpy(data.normalise(np.stack(images))).to(device)
        scored = predict_tensor(model, tensor, mc_samples=mc_samples, tta=tta)
        batch = {k: rows.loc[good, k].to_numpy() for k in rows.columns if k in (*_META, "label")}
        predictions.append(predictions_frame(batch, scored))
    columns = [*PREDICTION_COLUMNS, "logit"]
    out = pd.concat(predictions, ignore_index=True)[columns] if predictions else pd.DataFrame(columns=columns)
    return out, pd.DataFrame(failures, columns=["image_id", "path", "error"])


# --------------------------------------------------------------------------------------------------
# The ``predict`` command.


def read_preprocessing(bundle: str | Path) -> dict | None:
    """The bundle's ``preprocessing.json`` (how its training images were made), or None for an older bundle."""
    import json

    path = Path(bundle) / "preprocessing.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        size = [int(v) for v in record["size"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a preprocessing record ({err})") from err
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{path}: size must be [height, width], got {record['size']}")
    return {**record, "size": size}


# A bundle's record of its files (size and SHA-256 of each), written last into the bundle as export assembles it.
BUNDLE_MANIFEST = "bundle.json"
# The files predict reads of a bundle: each is checked against bundle.json before any is read.
PREDICT_READS = ("model.safetensors", "config.yaml", "thresholds.json", "preprocessing.json")


class BundleError(ValueError):
    """A bundle whose files are not the ones its ``bundle.json`` records: cut short, mixed with another's, damaged."""


def check_bundle(bundle: str | Path, names: Iterable[str] | None = None) -> bool:
    """Check a bundle's files against its ``bundle.json``: each of ``names`` (default: every file it lists) must
    have the size and SHA-256 recorded there, and a file of ``names`` that it does not list must be absent.

    A bundle exported before bundles carried the record has none, and is not checked: its files are read as they
    are, as before (export it again to add the record).

    Returns:
        True when the files were checked, False for a bundle without ``bundle.json``.

    Raises:
        BundleError: naming the bundle folder and the first file that does not match.
    """
    import json

    bundle = Path(bundle)
    record_path = bundle / BUNDLE_MANIFEST
    if not record_path.is_file():
        return False
    try:
        files = json.loads(record_path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(
            f"{bundle}: {BUNDLE_MANIFEST} is not a bundle record ({err}); export the bundle again"
        ) from err
    for name in files if names is None else names:
        expected = files.get(name)
        if expected is None:
            if (bundle / name).exists():
                raise BundleError(
                    f"{bundle}: {name} is not one of the files {BUNDLE_MANIFEST} records, so it comes from another "
                    "export; export the bundle again"
                )
            continue
        problem = io.record_mismatch(bundle / name, expected)
        if problem:
            raise BundleError(
                f"{bundle}: {name} {problem} ({BUNDLE_MANIFEST}): the bundle is incomplete or damaged (an interrupted "
                "export or copy); export it again, or copy it whole from where it was exported"
            )
    return True


def load_bundle(bundle: str | Path, *, check: bool = True):
    """Load an exported bundle: the model (weights only, no unpickling), its config and thresholds.

    Args:
        check: check the files predict reads against the bundle's ``bundle.json`` first (:func:`check_bundle`);
            export turns it off for the bundle it is still assembling, which has no record yet.

    Raises:
        FileNotFoundError: not a bundle (naming where an interrupted export left one, if it did).
        BundleError: a file that does not match the bundle's record.
        ValueError: a file that cannot be read.
    """
    import json

    from safetensors.torch import load_file

    from mammo_ray import config as config_mod
    from mammo_ray.train import model_from_config

    bundle = Path(bundle)
    for name in ("model.safetensors", "config.yaml"):
        if not (bundle / name).is_file():
            raise FileNotFoundError(f"{bundle} is not an exported bundle: {name} is missing{_staged_hint(bundle)}")
    if check and not check_bundle(bundle, PREDICT_READS):
        log.warning(
            "%s has no %s (exported before bundles recorded their files): its files are read unchecked; export it "
            "again to add the record",
            bundle,
            BUNDLE_MANIFEST,
        )
    cfg = config_mod.load(bundle / "config.yaml")
    net = model_from_config(cfg, for_inference=True)
    weights = bundle / "model.safetensors"
    try:
        net.load_state_dict(load_file(str(weights)))
    except Exception as err:  # safetensors' SafetensorError (a damaged file), torch's RuntimeError (another model)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{weights}: cannot be loaded into the model that {bundle / 'config.yaml'} describes "
            f"({cfg.model.backbone}): {first}"
        ) from err
    net.eval()
    thresholds_path = bundle / "thresholds.json"
    try:
        thresholds = json.loads(thresholds_path.read_text()) if thresholds_path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{thresholds_path}: not valid JSON ({err})") from err
    return net, cfg, thresholds


def _staged_hint(bundle: Path) -> str:
    """Where an export into ``bundle`` that was cut short between its renames left the complete new bundle."""
    from mammo_ray import export

    staged = export.interrupted_exports(bundle)[0]
    if not staged:
        return ""
    return (
        f"; an export into it was interrupted and left the complete bundle in {staged[0]}: the next export or train "
        f"into {bundle} finishes putting it in place, or rename it to {bundle}"
    )


def _input_frame(path: Path) -> pd.DataFrame:
    """Rows to score from a DICOM/PNG file, a folder (recursive) or a manifest."""
    from mammo_ray import manifest

    if path.is_file() and path.suffix.lower() in (".parquet", ".csv"):
        frame = manifest.read_manifest(path, required=("image_id", "path"))
        if "label" not in frame.columns:
            frame["label"] = -1
        repeated = frame["image_id"][frame["image_id"].duplicated()].unique()
        if len(repeated):
            raise ValueError(
                f"manifest {path}: {len(repeated)} image_id(s) appear more than once, e.g. {', '.join(repeated[:5])}; "
                "each row of the predictions is keyed by its image_id"
            )
        return frame
    if path.is_dir():
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file()
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
            and _looks_like_an_image(file)
        )
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"input {path} does not exist")
    rows = []
    for file in files:
        meta = _dicom_meta(file)
        rows.append(
            {"image_id": str(file.relative_to(path)) if path.is_dir() else file.name, "path": str(file), **meta}
        )
    return pd.DataFrame(rows)


IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", "")


def _looks_like_an_image(path: Path) -> bool:
    """A file a folder scan scores: by its name (``.dcm``, ``.dicom``, ``.png`` or none), else by the DICOM
    ``DICM`` marker, as PACS exports name files by their UID (``1.2.840….320``, whose "suffix" is ``.320``)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _dicom_meta(path: Path) -> dict:
    meta = {"patient_id": "", "exam_id": "", "laterality": "U", "view": "", "dataset": "", "label": -1}
    if path.suffix.lower() == ".png":
        return meta
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta["patient_id"] = str(ds.get("PatientID", ""))
        meta["exam_id"] = str(ds.get("AccessionNumber", "") or ds.get("StudyInstanceUID", ""))
        side = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).upper()
        meta["laterality"] = side if side in ("L", "R") else "U"
        meta["view"] = str(ds.get("ViewPosition", ""))
    except Exception as err:  # not a DICOM header: decoding reports the real error later
        log.debug("no DICOM header in %s: %s", path, err)
    return meta


def resolve_threshold(thresholds: dict, choice: str | None, default: float = 0.3) -> tuple[str, float]:
    """The decision threshold by name (``0.3``, ``youden``, ``spec0.90``, ``spec0.987``) or number.

    Without a choice, the bundle's ``thresholds.json`` default, else ``default`` (the bundle's ``train.threshold``).

    Raises:
        ValueError: an unknown name (listing the bundle's), or a number that is not a probability.
    """
    name = choice or thresholds.get("default") or f"{default:g}"
    entry = thresholds.get(name)
    if isinstance(entry, dict) and entry.get("threshold") is not None:
        return name, float(entry["threshold"])
    try:
        value = float(name)
    except ValueError:
        known = ", ".join(k for k, v in thresholds.items() if isinstance(v, dict) and "threshold" in v) or "none"
        raise ValueError(f"unknown threshold {name!r}; the bundle has: {known}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"--threshold {name}: a threshold on the probability must lie in [0, 1]")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    from mammo_ray import cli

    parser = argparse.ArgumentParser(prog="mammo-ray predict", description="Score images with an exported bundle.")
    parser.add_argument("--model", required=True, help="an exported bundle folder (results/<name>/best)")
    parser.add_argument("--input", required=True, help="a DICOM or PNG file, a folder (recursive) or a manifest")
    parser.add_argument("--out", default="predictions.csv", help="output CSV")
    parser.add_argument(
        "--threshold",
        help="0.3, youden, spec0.90, spec0.987 (per image), exam_spec0.90, exam_spec0.987 (per exam: a screen is "
        "recalled when any image reaches it) or a number (default: the bundle's)",
    )
    parser.add_argument("--batch-size", type=cli.int_at_least(1), default=16)
    parser.add_argument(
        "--mc-samples", type=cli.int_at_least(0), default=None, help="MC-dropout passes (default: the bundle's)"
    )
    parser.add_argument("--tta", action="store_true", default=None, help="add test-time flips")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present")
    parser.add_argument("--smoke-test", action="store_true", help="score at most 8 images")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


# The CSV's columns, in order (README, "predict"): the predictions' own, with the file's path after its id and the
# logit after the probability, then the decision and the breast score; ``error`` is filled on unreadable rows.
OUTPUT_COLUMNS = (
    "image_id",
    "path",
    *PREDICTION_COLUMNS[1 : PREDICTION_COLUMNS.index("prob") + 1],
    "logit",
    *PREDICTION_COLUMNS[PREDICTION_COLUMNS.index("prob") + 1 :],
    *("decision", "threshold", "threshold_name", "breast_score", "error"),
)


def check_output(out: Path, source: Path, paths: Iterable[str] = ()) -> None:
    """Refuse, before any image is scored, an ``--out`` that cannot take the CSV or would write into the input.

    ``paths``: the images to score; ``--out`` may not lie in (or under) a folder that holds one of them, so a
    manifest's or a single file's images are as safe as a folder input's (an ``--out`` that named an input image
    replaced it with the CSV).

    Raises:
        ValueError: a folder, the input file itself, a path inside the input folder or inside a folder that holds
            an input image, or a folder that cannot be created or written.
    """
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the CSV file to write, e.g. {out / 'predictions.csv'}")
    if source.is_file() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the --input manifest itself; write the predictions elsewhere")
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"--out {out} lies inside the --input folder {source}; predict does not write into the data")
    image_folders = {os.path.dirname(os.path.abspath(p)) for p in paths if isinstance(p, str) and p and "://" not in p}
    image_folders |= {os.path.realpath(folder) for folder in image_folders}
    for folder in (out.parent.absolute(), out.parent.resolve()):
        inside = sorted(image_folders & {str(f) for f in (folder, *folder.parents)})
        if inside:
            raise ValueError(
                f"--out {out} lies inside {inside[0]}, a folder that holds input images; predict does not write "
                "into the data"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # A folder that cannot be written fails now, not after every image has been scored.
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write in its folder ({err})") from err


def output_frame(
    frame: pd.DataFrame, predictions: pd.DataFrame, failures: pd.DataFrame, threshold, name
) -> pd.DataFrame:
    """One row per input image, scored or not, in :data:`OUTPUT_COLUMNS` order and the input's order."""
    from mammo_ray import metrics

    predictions = predictions.assign(decision=(predictions["prob"] >= threshold).astype(int))
    # A breast needs its woman and exam: a manifest without patient_id/exam_id would pool every L image of the file.
    known = (
        predictions["laterality"].isin(["L", "R"])
        & predictions["patient_id"].astype(str).ne("")
        & predictions["exam_id"].astype(str).ne("")
    )
    if known.any():
        keys = ["patient_id", "exam_id", "laterality", "dataset"]  # ids may repeat across data sets
        breast = metrics.breast_level(predictions[known])[[*keys, "prob"]].rename(columns={"prob": "breast_score"})
        predictions = predictions.merge(breast, on=keys, how="left")
    else:
        predictions["breast_score"] = np.nan
    inputs = frame.reset_index(drop=True)
    inputs = inputs.assign(
        path=inputs["path"].fillna("").astype(str) if "path" in inputs.columns else "",
        label=pd.to_numeric(inputs["label"], errors="coerce").fillna(-1).astype(int),
    )
    ids = [column for column in _META if column in inputs.columns]
    scores = predictions.drop(columns=[c for c in (*_META, "label") if c != "image_id"], errors="ignore")
    out = inputs[[*ids, "path", "label"]].merge(scores, on="image_id", how="left")
    out = out.merge(failures[["image_id", "error"]], on="image_id", how="left")
    scored = out["prob"].notna() | out["error"].isna()
    out["decision"] = out["decision"].where(scored, -1).fillna(-1).astype(int)
    out["threshold"] = threshold
    out["threshold_name"] = name
    return out.reindex(columns=list(OUTPUT_COLUMNS))


def main(argv: list[str] | None = None) -> int:
    import torch

    from mammo_ray import cli, manifest

    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    source, out = Path(args.input), Path(args.out)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
        net, cfg, thresholds = load_bundle(args.model)
        preprocessing = read_preprocessing(args.model)
        name, threshold = resolve_threshold(thresholds, args.threshold, cfg.train.threshold)
        frame = _input_frame(source)
        if frame.empty:
            raise ValueError(f"--input {source}: no DICOM or PNG files to score")
        remedy = cli.model_size_remedy(
            cfg.data.image_size, "pass its manifest, or pass the image files or their folder as --input"
        )
        manifest.check_cache_size(frame, cfg.data.image_size, args.input, remedy)
        check_output(out, source, frame["path"].tolist())
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.smoke_test:
        frame = frame.head(8)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    mc = cfg.train.mc_dropout_samples if args.mc_samples is None else args.mc_samples
    tta = cfg.train.tta if args.tta is None else args.tta
    torch.manual_seed(cfg.train.seed)  # MC-dropout masks: the same input gives the same CSV on the same machine
    predictions, failures = predict_frame(
        net,
        frame,
        image_size=tuple(cfg.data.image_size),
        batch_size=args.batch_size,
        mc_samples=mc,
        tta=tta,
        device=device,
        progress=True,
        preprocessing=preprocessing,
    )
    io.atomic_write_csv(out, output_frame(frame, predictions, failures, threshold, name))
    print(f"scored {len(predictions)} image(s), {len(failures)} unreadable → {out}")
    if predictions.empty:
        print(
            f"error: no image of {source} could be read; the reasons are in the error column of {out}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    # The importable module's main, not this ``__main__`` copy's: Ray pickles ``__main__`` by value (see prepare.py).
    from mammo_ray import predict as _module

    raise SystemExit(_module.main())
