"""``export_bundle`` on a checkpoint built here (no Ray, no training): what the bundle's metrics and card report."""

from __future__ import annotations

import json
import shutil
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
        if name == "brier":
            assert low <= val[name] <= high
        assert name in val["bootstrap"]["skipped"]
        shown = f"{val[name]:.3f} ({low:.3f}–{high:.3f})"  # ECE's basic bootstrap interval: no † (Clopper-Pearson's)
        assert f"| {shown} |" in card.split("| val |")[1].splitlines()[0]  # the validation row of the metrics table
        assert f"{'ECE' if name == 'ece' else 'Brier'} {shown}" in card  # the calibration section
        # 12 women on test, 4 with cancer: too few for an interval, and the card lists why.
        assert test[name] is not None and test[f"{name}_ci95"] is None
        assert f"- test: `{name}_ci95`: not reported: patients in this split: 3 with a positive image" in card
    assert "reliability.png" in card and "design effect" in card


def test_the_ece_interval_is_the_basic_bootstrap_and_the_card_says_it_may_lie_below_the_estimate(bundle):
    """ECE's percentile interval sat above its upward-biased estimate and never held a calibrated model's 0; the
    bundle gives the basic (bias-corrected) bootstrap interval, names its method, and the card says what it means."""
    results = json.loads((bundle / "metrics.json").read_text())
    val = results["val"]
    assert val["ece_ci95_method"] == metrics.BASIC_BOOTSTRAP == "basic bootstrap (bias-corrected)"
    assert "brier_ci95_method" not in val  # a mean of per-image terms, unbiased: the percentile interval
    assert "ECE: basic bootstrap (bias-corrected)" in val["bootstrap"]["method"]
    card = " ".join((bundle / "MODEL_CARD.md").read_text().split())
    assert "its CI is the basic bootstrap's" in card
    assert "an interval for the calibration error itself" in card and "may lie below the ECE shown" in card
    assert "would exclude its own estimate" not in card  # the old rule that withheld it is gone
    # The reliability plot's per-bin intervals: t on the bin's patients - 1 degrees of freedom, none from one woman.
    assert "with the t quantile on the bin's patients - 1 degrees of freedom; a bin of one patient gets none" in card


# --------------------------------------------------------------------------------------------------
# Bundles whose writing was cut short, and checkpoints whose writing or upload was.


def _train_checkpoint(folder: Path, epoch: int, val_auc: float, seed: int) -> Path:
    """A checkpoint as the worker writes it (``train._write_checkpoint``), with weights drawn from ``seed``."""
    import torch

    from mammo_ray import train

    cfg = config.load("demo", {"data.image_size": [64, 48], "data.use_cache": False})
    torch.manual_seed(seed)
    net = model_from_config(cfg, for_inference=True)
    report = {"epoch": epoch, "val_auc": val_auc, "trainable_params": 10}
    history = [{"epoch": e, "train_loss": 0.6, **{name: 0.5 for name in config.SELECTION_METRICS}} for e in (1, epoch)]
    folder.mkdir(parents=True)
    train._write_checkpoint(
        folder, model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), epoch=epoch, history=history,
        config_yaml=config.dump(cfg), predictions=_validation_predictions(seed=seed), metrics={}, report=report,
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def run_checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Two epochs of one Train run, as a sweep keeps them, with different weights."""
    runs = tmp_path_factory.mktemp("experiment") / export.TRAIN_RUNS / "trial_a"
    return {
        epoch: _train_checkpoint(runs / f"checkpoint_00{epoch}", epoch, 0.5 + epoch / 10, epoch) for epoch in (1, 2)
    }


@pytest.fixture(scope="module")
def first_bundle(run_checkpoints, tmp_path_factory) -> Path:
    """The bundle train writes of epoch 1."""
    return export.export_bundle(
        run_checkpoints[1], tmp_path_factory.mktemp("first") / "run", bootstrap=0, reference_files=True
    )


def _epochs_in(folder: Path, checkpoints: dict[int, Path]) -> set:
    """Which checkpoint each file of a bundle comes from: one epoch for a whole bundle, several for a mix."""

    def scored_by(scores: pd.Series) -> int:
        return next(
            epoch
            for epoch, checkpoint in checkpoints.items()
            if np.allclose(pd.read_csv(checkpoint / "val_predictions.csv")["prob"], scores)
        )

    weights = (folder / "model.safetensors").read_bytes()
    (reference,) = folder.glob("results_last_*.tsv")
    return {
        next(epoch for epoch, c in checkpoints.items() if (c / "model.safetensors").read_bytes() == weights),
        json.loads((folder / "metrics.json").read_text())["selected"]["epoch"],
        json.loads((folder / "thresholds.json").read_text())["provenance"]["epoch"],
        scored_by(pd.read_csv(folder / "val_predictions.csv")["prob"]),
        scored_by(pd.read_csv(reference, sep="\t")["score"]),
    }


def _cut_renames_at(monkeypatch, out: Path, cut: int, killed: bool) -> list:
    """Make the ``cut``-th rename into, out of or inside ``out`` fail; ``killed``: every later one too, as if the
    process had died there (nothing it tries afterwards reaches the disk)."""
    import os

    real, seen = os.replace, []

    def replace(source, target, *args, **kwargs):
        touched = {Path(source), *Path(source).parents, Path(target), *Path(target).parents}
        if out in touched:
            seen.append((source, target))
            if len(seen) == cut or (killed and len(seen) > cut):
                raise OSError(f"simulated failure at rename {len(seen)}")
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return seen


@pytest.mark.parametrize("killed", [False, True], ids=["error", "killed"])
@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_train_out_dir_whose_bundle_swap_is_cut_short_keeps_one_whole_bundle_and_its_ray_folder(
    run_checkpoints, first_bundle, tmp_path, monkeypatch, cut, killed
):
    """train --out_dir replaced its bundle file by file beside ray/: a failure after the second file left epoch 2's
    weights beside epoch 1's metrics and thresholds, which predict used without a word. Now every state a failure
    or a crash leaves has one whole bundle (or none, with the complete one named), the next export into the folder
    completes an interrupted one, and ray/ is never lost."""
    from mammo_ray import plots, predict

    monkeypatch.setattr(plots, "plot_all_bundle", lambda *args, **kwargs: None)  # seconds each, and not the point
    out = tmp_path / "run"
    shutil.copytree(first_bundle, out)
    (out / "ray" / "run-1").mkdir(parents=True)
    (out / "ray" / "run-1" / "result.json").write_text("{}")
    export.check_bundle_folder(out)
    seen = _cut_renames_at(monkeypatch, out, cut, killed)
    with pytest.raises(OSError, match="simulated failure"):
        export.export_bundle(run_checkpoints[2], out, bootstrap=0, reference_files=True)
    assert len(seen) >= cut
    monkeypatch.undo()
    if not killed:  # an error is undone: the previous bundle stands, whole, and nothing is left beside it
        assert _epochs_in(out, run_checkpoints) == {1}
        assert predict.check_bundle(out, predict.PREDICT_READS)
        assert (out / "ray" / "run-1" / "result.json").is_file()
        assert [p.name for p in tmp_path.iterdir()] == ["run"]
        return
    if out.exists():  # what a reader finds before anything repairs it: the old bundle or the new, never a mix
        assert len(_epochs_in(out, run_checkpoints)) == 1
        assert predict.check_bundle(out, predict.PREDICT_READS)
    else:
        with pytest.raises(FileNotFoundError, match="left the complete bundle in .*run.staging-"):
            predict.load_bundle(out)
    export.check_bundle_folder(out)  # what train and export run first
    assert _epochs_in(out, run_checkpoints) == ({1} if cut == 1 else {2})  # cut at 1: nothing had moved yet
    assert predict.check_bundle(out, predict.PREDICT_READS)
    assert (out / "ray" / "run-1" / "result.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_bundle_records_its_files_and_predict_refuses_one_that_does_not_match(bundle, tmp_path, capsys):
    """A bundle with a file cut short or taken from another export was loaded as it was; the error names the
    bundle folder and the file."""
    from mammo_ray import predict

    record = json.loads((bundle / "bundle.json").read_text())["files"]
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert sorted(record) == [name for name in on_disk if name != "bundle.json"]
    assert (
        "plots/roc.png" in record
        and record["model.safetensors"]["size"] == (bundle / "model.safetensors").stat().st_size
    )
    assert predict.check_bundle(bundle)

    cases = {
        "truncated": ("model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:-100])),
        "mixed": ("thresholds.json", lambda f: f.write_text(f.read_text().replace('"default": "0.35"', '"default": "0.3"'))),
        "missing": ("preprocessing.json", lambda f: f.unlink()),
    }  # fmt: skip
    for case, (name, damage) in cases.items():
        copy = tmp_path / case
        shutil.copytree(bundle, copy)
        damage(copy / name)
        assert predict.main(["--model", str(copy), "--input", str(tmp_path), "--out", str(tmp_path / "s.csv")]) == 2
        err = capsys.readouterr().err
        assert f"{copy}: {name} " in err and "bundle.json" in err, (case, err)
    edited = tmp_path / "edited-card"  # a file predict does not read: predict still loads the bundle
    shutil.copytree(bundle, edited)
    (edited / "MODEL_CARD.md").write_text("notes")
    predict.load_bundle(edited)
    with pytest.raises(predict.BundleError, match="MODEL_CARD.md"):
        predict.check_bundle(edited)


def test_a_checkpoint_cut_short_is_skipped_for_the_best_complete_one(run_checkpoints, tmp_path, caplog):
    """A checkpoint whose upload stopped part-way (a node that died) had every file present, one of them short, and
    export picked it as the best and copied its broken weights into the bundle."""
    experiment = tmp_path / "experiment"
    shutil.copytree(run_checkpoints[1].parents[2], experiment)
    best = experiment / export.TRAIN_RUNS / "trial_a" / "checkpoint_002"
    assert export.best_checkpoint(experiment, "val_auc", "max") == best
    weights = best / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="mammo_ray.export"):
        assert export.best_checkpoint(experiment, "val_auc", "max") == best.with_name("checkpoint_001")
    assert f"skipping checkpoint {best}: model.safetensors has" in caplog.text


def test_a_checkpoint_whose_content_differs_is_refused_naming_it(run_checkpoints, tmp_path, capsys):
    """Same size, other bytes (a damaged copy): export refuses it, naming the checkpoint and the file."""
    checkpoint = tmp_path / "checkpoint_002"
    shutil.copytree(run_checkpoints[2], checkpoint)
    predictions = checkpoint / "val_predictions.csv"
    text = predictions.read_text()
    predictions.write_text(text.replace("SYNTH", "SYNTX", 1))
    out = tmp_path / "best"
    with pytest.raises(ValueError, match=rf"checkpoint {checkpoint}: val_predictions.csv differs") as refused:
        export.export_bundle(checkpoint, out, bootstrap=0)
    assert isinstance(refused.value, export.CheckpointError) and not out.exists()


def test_a_checkpoint_from_before_the_file_record_still_exports(checkpoint, tmp_path, caplog):
    """Checkpoints written before report.json recorded their files are exported as found, with a warning."""
    assert "files" not in json.loads((checkpoint / "report.json").read_text())
    with caplog.at_level("WARNING", logger="mammo_ray.export"):
        out = export.export_bundle(checkpoint, tmp_path / "best", bootstrap=0)
    assert (out / "bundle.json").is_file()
    assert "records no file sizes or checksums" in caplog.text


def test_recovery_puts_the_previous_bundle_back_and_refuses_to_merge_two_run_folders(first_bundle, tmp_path):
    """A crash after the old bundle moved aside, with no complete new one, brings the old one back; a staged bundle
    and the folder that both hold ray/ are left for a person, with both named."""
    out = tmp_path / "run"
    aside = tmp_path / f".run{export.OLD_MARK}123"
    shutil.copytree(first_bundle, aside)
    (tmp_path / f".run{export.STAGING_MARK}abcdefgh").mkdir()  # cut short while assembling: no bundle.json, not used
    export.check_bundle_folder(out)
    assert (out / "bundle.json").is_file() and not aside.exists()

    staged = tmp_path / f".run{export.STAGING_MARK}ijklmnop"
    shutil.copytree(first_bundle, staged)
    for folder in (out, staged):
        (folder / "ray").mkdir()
    with pytest.raises(ValueError, match=rf"both it and {staged} .* hold ray"):
        export.check_bundle_folder(out)


def test_the_bundle_projects_its_points_at_the_screening_prevalence_given(checkpoint, bundle, tmp_path):
    """A high-risk clinic reads recall rates and PPV1 at its own prevalence, not at the default 6 per 1,000."""
    default = json.loads((bundle / "metrics.json").read_text())["test"]
    assert default["screening_prevalence"] == metrics.SCREENING_PREVALENCE
    out = export.export_bundle(checkpoint, tmp_path / "clinic", bootstrap=0, screening_prevalence=0.02)
    val = json.loads((out / "metrics.json").read_text())["val"]
    assert val["screening_prevalence"] == 0.02
    expected = metrics.screening_projection(val["sensitivity_exam@youden"], val["specificity_exam@youden"], 0.02)
    assert val["ppv1_screening@youden"] == pytest.approx(expected["ppv1"])
    assert "projected to 20 cancers per 1,000 screening exams" in (out / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("value", ["0", "1", "5", "-0.1", "five"])
def test_export_refuses_a_screening_prevalence_outside_zero_one(value, capsys):
    with pytest.raises(SystemExit):
        export.build_parser().parse_args(["--experiment", "x", "--screening-prevalence", value])
    assert "--screening-prevalence" in capsys.readouterr().err


def test_export_of_a_train_out_dir_says_what_it_is(tmp_path, capsys):
    """It said only that no checkpoint was under train_runs/, which a train folder never has."""
    folder = tmp_path / "demo-train"
    (folder / "ray" / "demo-20261207-120000" / "checkpoint_000").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    assert export.main(["--experiment", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a `train --out_dir`, not a sweep" in err and "predict --model" in err
