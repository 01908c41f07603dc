"""Ray Train runs: what each sampler feeds across 2 DDP workers, the train command, and predict on its bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mammo_ray import config, environment, manifest, predict, train


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


@pytest.mark.parametrize(
    "sampler",
    ["balanced", pytest.param("weighted", marks=pytest.mark.slow), pytest.param("simple", marks=pytest.mark.slow)],
)
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


def test_train_command_writes_bundle_and_reference_files(ray_session, synthetic_data, tmp_path, capsys):
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
            # The BatchNorm, deep-stem variant, so that its buffers go through training, export and predict.
            "--set",
            "model.stem=deep",
            "--set",
            "model.norm=batch",
            # Neither Ray's default for a 0.5-CPU worker (1) nor the demo's (2): the worker must apply it.
            "--set",
            "resources.torch_threads=3",
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
    assert (resolved.model.stem, resolved.model.norm) == ("deep", "batch")
    card = (out / "MODEL_CARD.md").read_text()
    assert "deep stem, batch norm" in card
    # The card names what the run ran on, as the worker recorded it (its 3 threads, not this process's).
    import torch

    trained_on = next(line for line in card.splitlines() if line.startswith("- Trained on: "))
    assert f"{environment.cpu_model()} (CPU kernels {environment.cpu_capability()}, 3 thread(s)), 1 worker(s)" in (
        trained_on
    )
    assert f"torch {torch.__version__}" in trained_on
    # Ray started the CPU worker with the malloc settings (train.CPU_WORKER_ENV): its own record says so.
    reports = sorted((out / "ray").rglob("checkpoint_*/report.json"))
    assert reports, "no checkpoint report under the run folder"
    recorded = json.loads(reports[-1].read_text())["environment"]
    assert recorded["malloc_settings"] == train.worker_env(resolved)
    # Each checkpoint records its files as uploaded; the bundle records its own, and its swap kept ray/ in place.
    assert all("model.safetensors" in json.loads(report.read_text())["files"] for report in reports)
    assert predict.check_bundle(out, predict.PREDICT_READS) and not list(tmp_path.glob(".run.*"))
    tsv = pd.read_csv(out / "results_last_ref.tsv", sep="\t")
    assert list(tsv.columns) == ["true_labels", "predicted_labels", "logits", "score", "uncertainty", "dataset"]
    history = pd.read_csv(out / "history.csv")
    assert history["train_positive_fraction"].iloc[-1] == 0.5
    assert history["torch_threads"].iloc[-1] == 3
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

    # A manifest whose cache is smaller than the model's 64×48 is refused, not upsampled.
    small = manifest.read_manifest(tmp_path / "data-smoke" / "prepared" / "valid.parquet", "valid")
    small = small.assign(cache_height=32, cache_width=24)
    small.to_parquet(tmp_path / "small.parquet")
    refused = tmp_path / "refused.csv"
    assert predict.main(["--model", str(out), "--input", str(tmp_path / "small.parquet"), "--out", str(refused)]) == 2
    assert "pixel-cache images of 32×24, smaller than data.image_size 64×48" in capsys.readouterr().err
    assert not refused.exists()


def test_train_bundle_keeps_the_best_epoch_and_the_whole_history(prepared_data, tmp_path, monkeypatch):
    """``train --out_dir``: the weights and predictions of the best epoch, history.csv of every epoch that ran."""
    import types

    import numpy as np
    import torch

    from mammo_ray import cli

    cfg = _config(**{"train.epochs": 3, "resources.num_workers": 1})
    cfg.name = "whole"
    frames = {"valid": manifest.read_manifest(prepared_data["valid"], "valid")}
    net = train.model_from_config(cfg)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    reports = [{"epoch": e, "val_auc": auc, "train_loss": 0.7 - 0.1 * e} for e, auc in ((1, 0.6), (2, 0.9), (3, 0.7))]
    folders = []
    for i, report in enumerate(reports):
        folder = tmp_path / "run" / f"checkpoint_{i}"
        folder.mkdir(parents=True)
        predictions = frames["valid"][list(predict.PREDICTION_COLUMNS[:7])].assign(
            prob=np.random.default_rng(i).uniform(size=len(frames["valid"])), aleatoric=np.nan, epistemic=np.nan
        )
        train._write_checkpoint(
            folder,
            model=net,
            optimizer=optimizer,
            epoch=report["epoch"],
            history=reports[: i + 1],
            config_yaml=config.dump(cfg),
            predictions=predictions,
            metrics={},
            report=report,
        )
        folders.append(folder)

    def checkpoint(folder):
        return types.SimpleNamespace(path=str(folder))

    result = types.SimpleNamespace(
        return_value=reports[-1],
        metrics=reports[-1],
        checkpoint=checkpoint(folders[-1]),  # Train's Result.checkpoint: the last one saved
        best_checkpoints=[(checkpoint(f), r) for f, r in zip(folders, reports, strict=True)],
        get_best_checkpoint=lambda metric, mode: checkpoint(folders[1]),
    )
    monkeypatch.setattr(cli, "start_ray", lambda address=None: None)
    monkeypatch.setattr(train, "make_trainer", lambda *a, **k: types.SimpleNamespace(fit=lambda: result))
    out = tmp_path / "out"
    assert train.run_single(cfg, frames, out, address=None) == 0
    assert json.loads((out / "metrics.json").read_text())["selected"]["epoch"] == 2
    best_probs = pd.read_csv(folders[1] / "val_predictions.csv")["prob"]
    assert pd.read_csv(out / "val_predictions.csv")["prob"].tolist() == pytest.approx(best_probs.tolist())
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3]


def test_train_loads_a_weights_file_named_relative_to_the_working_directory(
    ray_session, prepared_data, tmp_path, monkeypatch
):
    """``model.pretrained`` as a user writes it, relative to where they run: the Train worker, which runs in its
    run's folder, loads that file (before, it looked for the name in its own folder and failed after Ray started)."""
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(123)
    weights = {k: v.contiguous() for k, v in timm.create_model("convnext_atto", in_chans=1).state_dict().items()}
    (tmp_path / "weights").mkdir()
    save_file(weights, tmp_path / "weights" / "atto.safetensors")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    sets = {
        "model.pretrained": "weights/atto.safetensors",
        "model.freeze_units": 1,  # the stem: frozen, so the bundle must carry the file's stem unchanged
        "data.image_size": "[64,48]",
        "train.epochs": 1,
        "train.epoch_length": 32,
        "train.batch_size": 8,
        "train.augment": "false",
        "resources.cpus_per_worker": 0.5,
    }
    args = ["--config", "demo", "--train", prepared_data["train"], "--valid", prepared_data["valid"]]
    code = train.main([*args, "--out_dir", str(out), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    assert code == 0
    trained = load_file(out / "model.safetensors")
    for key in ("stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"):
        assert torch.equal(trained[key], weights[key]), key
    # The unfrozen stages trained away from the file, and the bundle names the file by its absolute path.
    assert not torch.equal(trained["stages.0.blocks.0.conv_dw.weight"], weights["stages.0.blocks.0.conv_dw.weight"])
    resolved = config.load(out / "config.yaml")
    assert resolved.model.pretrained == str(tmp_path / "weights" / "atto.safetensors")


@pytest.mark.slow
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


def _fit(cfg, prepared_data, storage, name):
    frames = manifest.load_manifests({"train": prepared_data["train"], "valid": prepared_data["valid"]})
    result = train.make_trainer(cfg, frames, run_name=name, storage_path=str(storage)).fit()
    checkpoint = train.best_checkpoint_dir(result, "val_auc", "max")
    return result, pd.read_csv(checkpoint / "val_predictions.csv"), pd.read_csv(checkpoint / "history.csv")


def test_attenuation_mc_dropout_and_ema_export_uncertainties(ray_session, prepared_data, tmp_path):
    cfg = _config(
        **{
            "resources.num_workers": 1,
            "model.attenuation": True,
            "model.dropout": 0.3,
            "train.mc_dropout_samples": 3,
            "train.tta": True,
            "train.ema": True,
            "train.ema_decay": 0.9,
        }
    )
    _, predictions, _ = _fit(cfg, prepared_data, tmp_path, "attenuation")
    assert (predictions["aleatoric"] >= 0).all() and predictions["aleatoric"].std() > 0
    assert predictions["epistemic"].notna().all() and (predictions["epistemic"] >= 0).all()
    assert predictions["epistemic"].std() > 0
    assert predictions["prob"].between(0, 1).all()


@pytest.mark.slow
def test_identical_seeds_give_identical_cpu_runs(ray_session, prepared_data, tmp_path):
    cfg = _config(**{"resources.num_workers": 1, "train.sampler": "weighted", "train.epoch_length": 48})
    _, first_predictions, first = _fit(cfg, prepared_data, tmp_path, "seeded-a")
    _, second_predictions, second = _fit(cfg, prepared_data, tmp_path, "seeded-b")
    assert first["train_loss"].tolist() == second["train_loss"].tolist()
    assert first_predictions["prob"].tolist() == second_predictions["prob"].tolist()
    cfg_other = _config(
        **{"resources.num_workers": 1, "train.sampler": "weighted", "train.epoch_length": 48, "train.seed": 1}
    )
    _, _, other = _fit(cfg_other, prepared_data, tmp_path, "seeded-c")
    assert other["train_loss"].tolist() != first["train_loss"].tolist()


def test_validation_is_never_augmented(ray_session, prepared_data):
    """The training stream is augmented; the validation stream gives the cached pixels, identical on every pass."""
    import numpy as np

    from mammo_ray import cache, data

    frames = manifest.load_manifests({"train": prepared_data["train"], "valid": prepared_data["valid"]})
    datasets = data.training_datasets(
        frames, num_workers=1, sampler="simple", image_size=(64, 48), use_cache=True, seed=0,
        augment_images=True, positive_strength=2.0, load_batch_size=8,
    )  # fmt: skip

    def rows(name):
        out = {}
        for batch in datasets[name].iter_batches(batch_size=64, batch_format="numpy"):
            out.update(zip(batch["image_id"], batch["image"], strict=True))
        return out

    first, second = rows("valid_0"), rows("valid_0")
    valid = frames["valid"].set_index("image_id")
    assert set(first) == set(valid.index)
    for image_id, image in first.items():
        row = valid.loc[image_id]
        cached = cache.read_image(row.cache_file, row.cache_offset, row.cache_nbytes, row.cache_height, row.cache_width)
        assert np.array_equal(image, cached[None]), "validation images are the cached pixels, unchanged"
        assert np.array_equal(image, second[image_id])
    train_rows = rows("train_0")
    changed = 0
    for image_id, image in train_rows.items():
        row = frames["train"].set_index("image_id").loc[image_id]
        cached = cache.read_image(row.cache_file, row.cache_offset, row.cache_nbytes, row.cache_height, row.cache_width)
        changed += not np.array_equal(image, cached[None])
    assert changed > len(train_rows) // 2  # both classes go through the same augmentation


def test_one_pass_holds_several_epochs_each_a_permutation(ray_session, prepared_data):
    """epochs_per_pass: every row once per copy, a new seeded order per copy, the same sequence for the same seed."""
    from mammo_ray import data

    frame = manifest.load_manifests({"train": prepared_data["train"]})["train"]
    n = len(frame)

    def sequence(seed):
        dataset = data.make_dataset(
            frame, image_size=(64, 48), use_cache=True, shuffle_seed=seed, load_batch_size=8, epochs_per_pass=3
        )
        dataset.context.execution_options = train._ingest_options()  # preserve_order, as a Train worker sees it
        ids = []
        for batch in dataset.iter_batches(batch_size=16, batch_format="numpy"):
            assert batch["image"].dtype.name == "uint16"
            ids.extend(batch["image_id"].tolist())
        return ids

    first = sequence(0)
    assert len(first) == 3 * n
    copies = [first[i * n : (i + 1) * n] for i in range(3)]
    for copy in copies:
        assert sorted(copy) == sorted(frame["image_id"]), "each copy is one permutation of the rows"
    assert copies[0] != copies[1] != copies[2], "each copy has its own order"
    assert sequence(0) == first, "same seed, same sequence"
    assert sequence(1) != first


def test_augmented_stream_does_not_depend_on_the_block_layout(ray_session, prepared_data, monkeypatch):
    """The same seed gives the same augmented images however the pass is cut into blocks and map batches (the
    layout follows the pass length and the cluster's CPUs), so a 15-epoch run repeats a 48-epoch run's first 15."""
    import numpy as np
    import ray

    from mammo_ray import data

    frame = manifest.load_manifests({"train": prepared_data["train"]})["train"]
    rows, cpus = 2 * len(frame), int(ray.cluster_resources()["CPU"])

    def stream(min_block_rows):
        monkeypatch.setattr(data, "MIN_BLOCK_ROWS", min_block_rows)
        dataset = data.make_dataset(
            frame, image_size=(64, 48), use_cache=True, shuffle_seed=0, augment_images=True, augment_seed=5,
            load_batch_size=8, epochs_per_pass=2,
        )  # fmt: skip
        dataset.context.execution_options = train._ingest_options()
        ids, images = [], []
        for batch in dataset.iter_batches(batch_size=16, batch_format="numpy"):
            ids.extend(batch["image_id"].tolist())
            images.append(batch["image"])
        return data.block_bounds(rows, 8, cpus), ids, np.concatenate(images)

    few_bounds, few_ids, few = stream(rows)  # as few blocks as the floor allows
    many_bounds, many_ids, many = stream(7)  # more blocks, of sizes that are not all multiples of the 8-row batches
    assert len(many_bounds) > len(few_bounds) and (np.diff(many_bounds) % 8).any()
    assert len(few_ids) == rows and many_ids == few_ids
    np.testing.assert_array_equal(many, few)


def _coordinator_requests() -> set[str]:
    """Requester ids registered with Ray Data's cluster-wide AutoscalingCoordinator (Data streams and Train runs).

    Ray 2.60 internals, read only to check that a stopped run gave its budget back."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    return set(ray.get(coordinator.__ray_call__.remote(lambda self: list(self._ongoing_reqs)), timeout=30))


def test_a_stopped_run_leaves_at_the_next_step_and_gives_back_its_budget(ray_session, prepared_data, tmp_path):
    import threading
    import time

    # Two DDP workers, so both ranks have to leave at the same step; far more epochs than the test waits for.
    cfg = _config(**{"train.epochs": 50, "train.sampler": "weighted", "search.checkpoints_to_keep": 2})
    frames = manifest.load_manifests({"train": prepared_data["train"], "valid": prepared_data["valid"]})
    before = _coordinator_requests()
    stopper = train.RunStopper()
    trainer = train.make_trainer(cfg, frames, run_name="stopped", storage_path=str(tmp_path), stopper=stopper)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=stopper.fit(trainer)), daemon=True)
    thread.start()
    run_dir = tmp_path / "stopped"
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("checkpoint_*/report.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(run_dir.glob("checkpoint_*/report.json")), "no epoch finished"
    assert stopper.stop(timeout=120), "fit() did not return after the stop request"
    result = outcome["result"]
    assert result.error is None
    assert result.return_value["stopped"] is True
    assert 1 <= result.return_value["epoch"] < 50
    # Every stream and the run itself cancelled their resource requests (none left to expire in minutes).
    assert _coordinator_requests() - before == set()
