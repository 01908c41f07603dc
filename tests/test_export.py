"""``export_bundle`` on a checkpoint built here (no Ray, no training): what the bundle's metrics and card report."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from safetensors.torch import save_file

from mammo_ray import config, export, metrics
from mammo_ray.train import model_from_config

THRESHOLD = 0.35  # the bundle's train.threshold, not the reference's 0.3


def _validation_predictions(n_patients: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for side in ("L", "R"):
            label = int(p % 4 == 0 and side == "L")
            for view in ("CC", "MLO"):
                rows.append(
                    {"image_id": f"v{p}_{side}_{view}", "patient_id": f"v{p}", "exam_id": f"v{p}e", "laterality": side,
                     "view": view, "dataset": "SYNTH", "label": label,
                     "prob": float(np.clip(rng.normal(0.3 + 0.2 * label, 0.1), 0, 1)), "aleatoric": np.nan,
                     "epistemic": np.nan}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=list(metrics.PREDICTION_COLUMNS))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint folder as a trial writes it: random weights of the demo's model at 64×48, decoding on the fly."""
    import torch

    folder = tmp_path_factory.mktemp("checkpoint")
    cfg = config.load("demo", {"data.image_size": [64, 48], "data.use_cache": False, "train.threshold": THRESHOLD})
    torch.manual_seed(0)
    net = model_from_config(cfg, for_inference=True)
    save_file({key: value.contiguous() for key, value in net.state_dict().items()}, folder / "model.safetensors")
    config.save(cfg, folder / "config.yaml")
    _validation_predictions().to_csv(folder / "val_predictions.csv", index=False)
    history = {name: [0.5] for name in config.SELECTION_METRICS}
    pd.DataFrame({"epoch": [1], "train_loss": [0.6], **history}).to_csv(folder / "history.csv", index=False)
    (folder / "report.json").write_text(json.dumps({"epoch": 1, "val_auc": 0.5, "trainable_params": 10}))
    return folder


@pytest.fixture(scope="module")
def test_manifest(tmp_path_factory) -> pd.DataFrame:
    """12 women, L and R CC; the left breast of every third is positive. Two files cannot be read: one of a
    positive image and one of a negative."""
    folder = tmp_path_factory.mktemp("test-images")
    rng = np.random.default_rng(1)
    rows = []
    for p in range(12):
        for side in ("L", "R"):
            image_id = f"t{p}_{side}"
            path = folder / f"{image_id}.png"
            image = np.zeros((96, 72), np.uint16)
            image[10:86, :50] = rng.integers(20000, 50000, (76, 50), dtype=np.uint16)  # a breast against the air
            cv2.imwrite(str(path), image if side == "L" else image[:, ::-1])
            rows.append(
                {"image_id": image_id, "path": str(path), "patient_id": f"t{p}", "exam_id": f"t{p}e",
                 "laterality": side, "view": "CC", "dataset": "SYNTH", "label": int(p % 3 == 0 and side == "L")}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    for image_id in ("t0_L", "t1_L"):  # positive, negative
        Path(frame.loc[frame["image_id"] == image_id, "path"].iloc[0]).write_bytes(b"not an image")
    return frame


@pytest.fixture(scope="module")
def bundle(checkpoint, test_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "best"
    return export.export_bundle(checkpoint, out, frames={"test": test_manifest}, bootstrap=50)


def test_the_bundles_own_threshold_is_evaluated_on_both_splits(bundle):
    """With train.threshold 0.35 the test figures were at 0.3 only, a threshold the bundle does not decide at."""
    results = json.loads((bundle / "metrics.json").read_text())
    test = pd.read_csv(bundle / "test_predictions.csv")
    for split, frame in (("val", pd.read_csv(bundle / "val_predictions.csv")), ("test", test)):
        values = results[split]
        sens, spec = metrics.sens_spec_at(frame["label"], frame["prob"], THRESHOLD)
        assert (values["sensitivity@0.35"], values["specificity@0.35"]) == pytest.approx((sens, spec))
        assert "sensitivity@0.3" in values and "specificity@0.3" in values  # the reference's names stay
        assert "specificity@0.35" in values["bootstrap"]["skipped"]
    assert results["selected"]["decision_threshold"] == THRESHOLD
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "sens@0.35" in card and "spec@0.35" in card and "sens@0.3 " not in card
    thresholds = json.loads((bundle / "thresholds.json").read_text())
    assert thresholds["default"] == "0.35" and "train.threshold" in thresholds["provenance"]["note"]


def test_images_that_cannot_be_read_are_counted_in_metrics_json_and_the_card(bundle, test_manifest):
    """8 positive test images that failed to decode dropped out of the metrics without a word: AUC 0.432 became
    0.339 while the card's Data table still counted them."""
    results = json.loads((bundle / "metrics.json").read_text())
    test = results["test"]
    assert (test["n_failed"], test["n_failed_positive"]) == (2, 1)
    assert test["n_images"] == len(test_manifest) - 2 and test["n_positive"] == int(test_manifest["label"].sum()) - 1
    assert "n_failed" not in results["val"]  # a validation image that cannot be read stops the trial instead
    assert sorted(pd.read_csv(bundle / "test_failures.csv")["image_id"]) == ["t0_L", "t1_L"]
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "2 of 24 test images (1 of them positive) could not be read and are left out of the test figures" in card


def test_ece_and_brier_carry_their_patient_intervals_into_metrics_json_and_the_card(bundle):
    """The card showed ECE and Brier as bare point estimates beside AUCs with intervals."""
    results = json.loads((bundle / "metrics.json").read_text())
    val, test = results["val"], results["test"]
    card = (bundle / "MODEL_CARD.md").read_text()
    for name in ("ece", "brier"):
        low, high = val[f"{name}_ci95"]  # 10 women with cancer among 40 on validation
        assert low <= val[name] <= high
        assert name in val["bootstrap"]["skipped"]
        shown = f"{val[name]:.3f} ({low:.3f}–{high:.3f})"
        assert f"| {shown} |" in card.split("| val |")[1].splitlines()[0]  # the validation row of the metrics table
        assert f"{'ECE' if name == 'ece' else 'Brier'} {shown}" in card  # the calibration section
        # 12 women on test, 4 with cancer: too few for an interval, and the card lists why.
        assert test[name] is not None and test[f"{name}_ci95"] is None
        assert f"- test: `{name}_ci95`: not reported: patients in this split: 3 with a positive image" in card
    assert "reliability.png" in card and "design effect" in card
