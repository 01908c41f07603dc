"""Inference: scores with aleatoric and epistemic uncertainty, and the ``predict`` command.

``predict_tensor`` is the one place where a model turns images into probabilities; validation in
the worker loop, export (test predictions) and ``python -m mammo_ray.predict`` all call it.

* ``prob``: sigmoid of the logit μ (the mean over passes when MC dropout or TTA is on).
* ``aleatoric``: σ² of the attenuation head (Kendall & Gal 2017), in logit units; NaN without one.
* ``epistemic``: the variance of the probability over K MC-dropout passes (Gal & Ghahramani 2016)
  and/or test-time flips; NaN when neither is configured.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mammo_ray.metrics import PREDICTION_COLUMNS

log = logging.getLogger(__name__)

_META = ("image_id", "patient_id", "exam_id", "laterality", "view", "dataset")


def _enable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.train()


def predict_tensor(model, images, *, mc_samples: int = 0, tta: bool = False, use_amp: bool = False) -> dict:
    """Score one batch. Returns numpy arrays ``logit``, ``prob``, ``aleatoric``, ``epistemic``."""
    import torch

    from mammo_ray.losses import split_output

    was_training = model.training
    model.eval()
    device_type = images.device.type
    passes = []
    with torch.no_grad(), torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_amp):
        output = model(images).float()
        logit, log_var = split_output(output)
        passes.append(torch.sigmoid(logit))
        if tta:
            # Up-down flip only: images are oriented chest wall left, so a left-right flip is not a view the
            # model was trained on.
            flipped = model(torch.flip(images, dims=[2])).float()
            passes.append(torch.sigmoid(split_output(flipped)[0]))
        if mc_samples > 0:
            _enable_dropout(model)
            for _ in range(mc_samples):
                passes.append(torch.sigmoid(split_output(model(images).float())[0]))
            model.eval()
    model.train(was_training)
    stack = torch.stack(passes)
    prob = stack.mean(0) if len(passes) > 1 else stack[0]
    epistemic = stack.var(0, unbiased=False) if len(passes) > 1 else torch.full_like(prob, float("nan"))
    aleatoric = torch.exp(log_var) if log_var is not None else torch.full_like(prob, float("nan"))
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
    frame["label"] = np.asarray(batch["label"]).astype(int) if "label" in batch else -1
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score manifest rows in this process (no Ray). Returns (predictions, failures with path and error)."""
    import torch

    from mammo_ray import data, imaging, manifest

    use_cache = use_cache and manifest.has_cache(frame)
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
            try:
                batch = {k: np.array([row[k]]) for k in row.index}
                images.append(data.decode_rows(batch, image_size, use_cache)[0])
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


def load_bundle(bundle: str | Path):
    """Load an exported bundle: the model (weights only, no unpickling), its config and thresholds."""
    import json

    from safetensors.torch import load_file

    from mammo_ray import config as config_mod
    from mammo_ray.train import model_from_config

    bundle = Path(bundle)
    for name in ("model.safetensors", "config.yaml"):
        if not (bundle / name).is_file():
            raise FileNotFoundError(f"{bundle} is not an exported bundle: {name} is missing")
    cfg = config_mod.load(bundle / "config.yaml")
    net = model_from_config(cfg, for_inference=True)
    net.load_state_dict(load_file(str(bundle / "model.safetensors")))
    net.eval()
    thresholds_path = bundle / "thresholds.json"
    thresholds = json.loads(thresholds_path.read_text()) if thresholds_path.is_file() else {}
    return net, cfg, thresholds


def _input_frame(path: Path) -> pd.DataFrame:
    """Rows to score from a DICOM/PNG file, a folder (recursive) or a manifest."""
    from mammo_ray import manifest

    if path.is_file() and path.suffix.lower() in (".parquet", ".csv"):
        return manifest.read_manifest(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom", ".png", ""))
        files = [p for p in files if not p.name.startswith(".")]
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
    """The decision threshold by name (``0.3``, ``youden``, ``spec0.90``, ``spec0.987``) or number."""
    name = choice or thresholds.get("default", "0.3")
    entry = thresholds.get(name)
    if isinstance(entry, dict) and entry.get("threshold") is not None:
        return name, float(entry["threshold"])
    try:
        return name, float(name)
    except ValueError:
        known = ", ".join(k for k in thresholds if k != "default") or "none"
        raise ValueError(f"unknown threshold {name!r}; the bundle has: {known}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammo-ray predict", description="Score images with an exported bundle.")
    parser.add_argument("--model", required=True, help="an exported bundle folder (results/<name>/best)")
    parser.add_argument("--input", required=True, help="a DICOM or PNG file, a folder (recursive) or a manifest")
    parser.add_argument("--out", default="predictions.csv", help="output CSV")
    parser.add_argument("--threshold", help="0.3, youden, spec0.90, spec0.987 or a number (default: the bundle's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mc-samples", type=int, default=None, help="MC-dropout passes (default: the bundle's)")
    parser.add_argument("--tta", action="store_true", default=None, help="add test-time flips")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--smoke-test", action="store_true", help="score at most 8 images")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    from mammo_ray import cli, io, manifest, metrics

    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    try:
        net, cfg, thresholds = load_bundle(args.model)
        frame = _input_frame(Path(args.input))
        remedy = cli.model_size_remedy(
            cfg.data.image_size, "pass its manifest, or pass the image files or their folder as --input"
        )
        manifest.check_cache_size(frame, cfg.data.image_size, args.input, remedy)
        name, threshold = resolve_threshold(thresholds, args.threshold, cfg.train.threshold)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.smoke_test:
        frame = frame.head(8)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    mc = cfg.train.mc_dropout_samples if args.mc_samples is None else args.mc_samples
    tta = cfg.train.tta if args.tta is None else args.tta
    predictions, failures = predict_frame(
        net,
        frame,
        image_size=tuple(cfg.data.image_size),
        batch_size=args.batch_size,
        mc_samples=mc,
        tta=tta,
        device=device,
        progress=True,
    )
    predictions["decision"] = (predictions["prob"] >= threshold).astype(int)
    predictions["threshold"] = threshold
    predictions["threshold_name"] = name
    known = predictions["laterality"].isin(["L", "R"])
    if known.any():
        breast = metrics.breast_level(predictions[known])
        keys = ["patient_id", "exam_id", "laterality"]
        breast = breast[[*keys, "prob"]].rename(columns={"prob": "breast_score"})
        predictions = predictions.merge(breast, on=keys, how="left")
    else:
        predictions["breast_score"] = np.nan
    if not failures.empty:
        failed = failures.assign(prob=np.nan, decision=-1, error=failures["error"])
        predictions = pd.concat([predictions, failed], ignore_index=True)
    io.atomic_write_csv(args.out, predictions)
    print(f"scored {len(predictions) - len(failures)} image(s), {len(failures)} unreadable → {args.out}")
    return 0


if __name__ == "__main__":
    # The importable module's main, not this ``__main__`` copy's: Ray pickles ``__main__`` by value (see prepare.py).
    from mammo_ray import predict as _module

    raise SystemExit(_module.main())
