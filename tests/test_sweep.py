"""End-to-end: a real sweep (Tune + Optuna + ASHA + TorchTrainer + Ray Data) and the CLI's fast failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mammo_ray import tune

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_tune_without_manifests_stops_before_ray():
    proc = run_module("mammo_ray.tune", "--space", "spaces/adamw.yaml")
    assert proc.returncode == 2
    assert "--train" in proc.stderr and "--valid" in proc.stderr and "make demo" in proc.stderr
    assert "Ray dashboard" not in proc.stdout  # Ray never started


def test_unknown_space_lists_available():
    proc = run_module("mammo_ray.tune", "--space", "nosuch", "--dry-run")
    assert proc.returncode == 2
    assert "Available:" in proc.stderr and "adamw" in proc.stderr and "demo" in proc.stderr


def test_dry_run_prints_config_space_and_plan():
    proc = run_module("mammo_ray.tune", "--space", "adamw", "--dry-run", "--set", "train.lr=3e-4")
    assert proc.returncode == 0, proc.stderr
    assert "# resolved config" in proc.stdout and "# search space" in proc.stdout
    assert "# resources per trial" in proc.stdout and "backend: nccl" in proc.stdout
    assert "lr: 0.0003" in proc.stdout


@pytest.mark.parametrize(
    ("override", "needle"),
    [("train.lrr=1", "train.lrr"), ("model.dropout=2", "model.dropout"), ("train.sampler=nope", "train.sampler")],
)
def test_bad_override_names_the_key(override, needle):
    proc = run_module("mammo_ray.tune", "--space", "demo", "--dry-run", "--set", override)
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_leaking_manifests_are_refused_before_ray(tmp_path):
    rows = []
    for split, patients in (("train", ["p1", "p2"]), ("valid", ["p2", "p3"])):
        for patient in patients:
            image = tmp_path / f"{split}_{patient}.png"
            image.write_bytes(b"")
            rows.append(
                dict(
                    image_id=f"{split}_{patient}",
                    path=str(image),
                    label=0,
                    patient_id=patient,
                    exam_id=f"{split}_{patient}_e",
                    laterality="L",
                    view="CC",
                    dataset="T",
                    split=split,
                )
            )
    frame = pd.DataFrame(rows)
    for split in ("train", "valid"):
        frame[frame.split == split].to_parquet(tmp_path / f"{split}.parquet")
    proc = run_module(
        "mammo_ray.tune",
        "--space",
        "demo",
        "--train",
        str(tmp_path / "train.parquet"),
        "--valid",
        str(tmp_path / "valid.parquet"),
        "--results",
        str(tmp_path / "results"),
    )
    assert proc.returncode == 2
    assert "p2" in proc.stderr and "refusing" in proc.stderr.lower()
    assert "Ray dashboard" not in proc.stdout
    assert not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def smoke_sweep(ray_session, tmp_path_factory):
    """One real two-trial sweep on synthetic DICOMs, shared by the tests below."""
    import os

    root = tmp_path_factory.mktemp("sweep")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = tune.main(
            ["--space", "demo", "--smoke-test", "--results", str(root / "results"), "--name", "smoke",
             "--set", f"data.synthetic.out={root / 'data'}"]
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    assert code == 0
    return root


def test_smoke_sweep_end_to_end(smoke_sweep):
    """Two trials of a real sweep (Tune + Optuna + ASHA + TorchTrainer + Ray Data), bundle checked against sklearn."""
    tmp_path = smoke_sweep
    results = tmp_path / "results"
    experiment = results / "smoke"
    board = pd.read_csv(experiment / "leaderboard.csv")
    assert len(board) == 2
    assert list(board.columns[:4]) == ["trial_id", "status", "stop_reason", "epochs"]
    assert {"train.lr", "model.dropout", "train.sampler", "model.freeze_units"} <= set(board.columns)
    assert (board["status"] == "TERMINATED").all()
    assert (experiment / "optuna.db").is_file()
    import optuna

    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert len(study.trials) == 2

    best = experiment / "best"
    for name in (
        "model.safetensors",
        "config.yaml",
        "metrics.json",
        "val_predictions.csv",
        "thresholds.json",
        "MODEL_CARD.md",
        "test_predictions.csv",
        "history.csv",
    ):
        assert (best / name).is_file(), name
    assert any((best / "plots").glob("*.png"))
    metrics = json.loads((best / "metrics.json").read_text())
    val = pd.read_csv(best / "val_predictions.csv")
    assert list(val.columns) == [
        "image_id",
        "patient_id",
        "exam_id",
        "laterality",
        "view",
        "dataset",
        "label",
        "prob",
        "aleatoric",
        "epistemic",
    ]
    assert metrics["val"]["n_images"] == len(val) == val["image_id"].nunique()
    assert metrics["val"]["n_positive"] == int(val["label"].sum())
    if val["label"].nunique() == 2:
        assert metrics["val"]["auc"] == pytest.approx(roc_auc_score(val["label"], val["prob"]), abs=1e-9)
    else:
        assert metrics["val"]["auc"] is None and "auc_reason" in metrics["val"]
    # The exported checkpoint is the best epoch of the best trial.
    best_value = board["val_auc_best"].max()
    if np.isfinite(best_value):
        assert metrics["selected"]["report"]["val_auc"] == pytest.approx(best_value)
    # Every validation image was scored exactly once (no rows dropped or duplicated by sharding).
    valid_manifest = pd.read_parquet(tmp_path / "data-smoke" / "prepared" / "valid.parquet")  # smoke data folder
    assert sorted(val["image_id"]) == sorted(valid_manifest["image_id"])
    history = pd.read_csv(best / "history.csv")
    for column in (
        "epoch",
        "train_loss",
        "val_loss",
        "val_auc",
        "train_positive_fraction",
        "images_per_s",
        "epoch_time_s",
    ):
        assert column in history.columns


def test_export_command_reexports_by_another_metric(smoke_sweep, tmp_path):
    """export --experiment picks the best checkpoint by the chosen metric and writes a full bundle."""
    from mammo_ray import export

    results = smoke_sweep / "results"
    out = tmp_path / "by_loss"
    assert export.main(["--experiment", str(results / "smoke"), "--metric", "val_loss", "--mode", "min",
                        "--out", str(out), "--bootstrap", "50"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    table = export.find_checkpoints(results / "smoke")
    assert metrics["selected"]["report"]["val_loss"] == pytest.approx(table["val_loss"].min())
    assert (out / "test_predictions.csv").is_file() and "test" in metrics
    assert export.main(["--experiment", str(results / "smoke"), "--metric", "nosuch"]) == 2
