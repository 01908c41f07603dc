"""Ray Train runs: what each sampler feeds across 2 DDP workers, the train command, and predict on its bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mammo_ray import config, manifest, predict, train


def _config(**overrides) -> config.Config:
    base = {
        "train.epochs": 1,
        "train.batch_size": 8,
        "train.epoch_length": 96,
        "train.amp": False,
        "train.augment": True,
        "data.image_size": [64, 48],
        "resources.num_workers": 2,
        "resources.cpus_per_worker": 0.5,
        "search.checkpoints_to_keep": 1,
    }
    return config.load("demo", {**base, **overrides})


@pytest.mark.parametrize("sampler", ["balanced", "weighted", "simple"])
def test_sampler_shares_across_two_workers(ray_session, prepared_data, tmp_path, sampler):
    cfg = _config(**{"train.sampler": sampler, "train.positive_fraction": 0.3})
    frames = manifest.load_manifests({"train": prepared_data["train"], "valid": prepared_data["valid"]})
    result = train.make_trainer(cfg, frames, run_name=f"sampler-{sampler}", storage_path=str(tmp_path)).fit()
    metrics = result.metrics
    fed = metrics["train_images"]
    assert fed == train.steps_per_epoch(cfg, len(frames["train"])) * 8 * 2  # both workers, every step
    share = metrics["train_positive_fraction"]
    if sampler == "balanced":
        assert metrics["train_batch_positive_min"] == metrics["train_batch_positive_max"] == 0.5
        assert share == 0.5
    elif sampler == "weighted":
        standard_error = math.sqrt(0.3 * 0.7 / fed)
        assert abs(share - 0.3) < 4 * standard_error
    else:
        natural = frames["train"]["label"].mean()
        assert abs(share - natural) < 0.12
    # Validation saw every image once, gathered from both ranks.
    checkpoint = train.best_checkpoint_dir(result, "val_auc", "max")
    predictions = pd.read_csv(checkpoint / "val_predictions.csv")
    assert sorted(predictions["image_id"].astype(str)) == sorted(frames["valid"]["image_id"])


def test_train_command_writes_bundle_and_reference_files(ray_session, synthetic_data, tmp_path):
    out = tmp_path / "run"
    code = train.main(
        [
            "--config",
            "demo",
            "--smoke-test",
            "--out_dir",
            str(out),
            "--exp_name",
            "ref",
            "--sampler",
            "Balanced",
            "--loss_function",
            "FocalLoss",
            "--fine_tuning",
            "partial",
            "--upto_freeze",
            "2",
            "--set",
            f"data.synthetic.out={tmp_path / 'data'}",
        ]
    )
    assert code == 0
    for name in (
        "model.safetensors",
        "config.yaml",
        "metrics.json",
        "history.csv",
        "val_predictions.csv",
        "results_last_ref.tsv",
        "ref_metrics.csv",
        "MODEL_CARD.md",
        "thresholds.json",
    ):
        assert (out / name).is_file(), name
    resolved = config.load(out / "config.yaml")
    assert (resolved.train.sampler, resolved.train.loss, resolved.model.freeze_units) == ("balanced", "focal", 2)
    tsv = pd.read_csv(out / "results_last_ref.tsv", sep="\t")
    assert list(tsv.columns) == ["true_labels", "predicted_labels", "logits", "score", "uncertainty", "dataset"]
    history = pd.read_csv(out / "history.csv")
    assert history["train_positive_fraction"].iloc[-1] == 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"val", "selected"}

    # predict on a folder of DICOMs with one unreadable file among them.
    images = tmp_path / "to_score"
    images.mkdir()
    dicoms = sorted((tmp_path / "data-smoke" / "dicom").rglob("*.dcm"))[:5]
    for path in dicoms:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.dcm").write_bytes(b"not a dicom file")
    scores = tmp_path / "scores.csv"
    assert predict.main(["--model", str(out), "--input", str(images), "--out", str(scores)]) == 0
    table = pd.read_csv(scores)
    assert len(table) == 6
    scored = table[table["error"].isna()] if "error" in table else table
    assert len(scored) == 5 and scored["prob"].between(0, 1).all()
    assert set(scored["decision"]) <= {0, 1}
    assert scored["breast_score"].notna().all()
    assert "broken.dcm" in " ".join(table["path"].dropna()) if "path" in table else True


def test_train_on_reference_csv_decodes_on_the_fly(ray_session, synthetic_data, tmp_path):
    """The reference's CSVs (path_eq, cancer, datasettype) train without a prepared cache."""
    reference = pd.read_csv(synthetic_data["reference_csv"])
    patients = sorted(reference["patient_id"].unique())
    root = tmp_path.parent
    for name, chosen in (("train.csv", patients[:16]), ("valid.csv", patients[16:])):
        part = reference[reference["patient_id"].isin(chosen)].copy()
        part["path_eq"] = [str((Path(synthetic_data["reference_csv"]).parent / p).resolve()) for p in part["path_eq"]]
        part.to_csv(tmp_path / name, index=False)
    out = tmp_path / "out"
    code = train.main(
        [
            "--train_csv_pth",
            str(tmp_path / "train.csv"),
            "--valid_csv_pth",
            str(tmp_path / "valid.csv"),
            "--smoke-test",
            "--out_dir",
            str(out),
            "--exp_name",
            "csv",
            "--sampler",
            "Simple",
        ]
    )
    assert code == 0, root
    val = pd.read_csv(out / "val_predictions.csv")
    assert len(val) == len(reference[reference["patient_id"].isin(patients[16:])])
