"""End-to-end: a real sweep (Tune + Optuna + ASHA + TorchTrainer + Ray Data) and the CLI's fast failures."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from s3_server import KEY, LocalS3
from sklearn.metrics import roc_auc_score

from mammo_ray import cli, config, tune

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


def test_overwrite_refuses_a_folder_that_holds_no_sweep_and_deletes_nothing(tmp_path):
    """--overwrite ran shutil.rmtree on whatever results/<name> was: a prepared data folder named like the sweep
    was deleted whole."""
    data = tmp_path / "results" / "embed"
    (data / "images").mkdir(parents=True)
    (data / "train.parquet").write_bytes(b"user data")
    (data / "images" / "a.dcm").write_bytes(b"user image")
    proc = run_module(
        "mammo_ray.tune", "--space", "demo", "--name", "embed", "--results", str(tmp_path / "results"), "--overwrite"
    )
    assert proc.returncode == 2, proc.stderr
    assert "does not hold a mammo_ray sweep" in proc.stderr and str(data) in proc.stderr
    assert "Ray dashboard" not in proc.stdout
    assert (data / "train.parquet").read_bytes() == b"user data" and (data / "images" / "a.dcm").is_file()


def test_holds_a_sweep_knows_a_sweep_folder_and_an_empty_one(tmp_path):
    assert not tune.holds_a_sweep(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tune.holds_a_sweep(empty)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "leaderboard.csv").write_text("trial_id\n")
    assert not tune.holds_a_sweep(sweep)
    (sweep / "manifests.json").write_text("{}")
    assert tune.holds_a_sweep(sweep)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "a\\\\b"])
def test_a_name_that_is_not_one_folder_name_is_refused_before_ray(name, tmp_path):
    proc = run_module(
        "mammo_ray.tune", "--space", "demo", "--set", f"name={name}", "--results", str(tmp_path), "--dry-run"
    )
    assert proc.returncode == 2 and "name must be a single folder name" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        ("mammo_ray.tune", ["--space", "demo", "--train", "mine.parquet"]),
        ("mammo_ray.tune", ["--space", "demo", "--valid", "mine.parquet", "--test", "t.parquet"]),
        ("mammo_ray.train", ["--train_csv_pth", "mine.csv"]),
        ("mammo_ray.train", ["--train", "mine.parquet", "--valid_csv_pth", "v.csv"]),
    ],
)
def test_half_of_the_users_data_is_an_error_not_the_synthetic_set(module, flags, tmp_path):
    """The demo space (train's default config) enables the synthetic set; with only --train given it trained on the
    synthetic set instead of the user's data, silently."""
    proc = run_module(module, *flags, "--results" if module.endswith("tune") else "--out_dir", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "given without the rest of its pair" in proc.stderr and "mine." in proc.stderr
    assert "Ray dashboard" not in proc.stdout and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["cli", "export", "predict", "prepare", "synth", "train", "tune"])
def test_python_dash_m_runs_the_importable_module(name, monkeypatch):
    """`python -m mammo_ray.<name>` calls the imported module's main, not that of a second, `__main__` copy.

    Ray pickles functions of `__main__` by value and what they call of it by name; a Ray worker has no such names
    (this broke every shard task of `python -m mammo_ray.prepare`).
    """
    import importlib
    import runpy
    import warnings

    module = importlib.import_module(f"mammo_ray.{name}")
    calls = []
    monkeypatch.setattr(module, "main", lambda argv=None: calls.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [name, "--no-such-flag"])
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # train's block sets it; keep it local
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already in sys.modules
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(f"mammo_ray.{name}", run_name="__main__")
    assert exit_info.value.code == 0
    assert calls == [None]


def test_unknown_space_lists_available():
    proc = run_module("mammo_ray.tune", "--space", "nosuch", "--dry-run")
    assert proc.returncode == 2
    assert "Available:" in proc.stderr and "adamw" in proc.stderr and "demo" in proc.stderr


def test_dry_run_prints_config_space_and_plan():
    proc = run_module("mammo_ray.tune", "--space", "adamw", "--dry-run", "--set", "train.grad_clip=3e-4")
    assert proc.returncode == 0, proc.stderr
    assert "# resolved config" in proc.stdout and "# search space" in proc.stdout
    assert "# resources per trial" in proc.stdout and "backend: nccl" in proc.stdout
    assert "grad_clip: 0.0003" in proc.stdout


def test_tune_refuses_a_set_on_a_searched_key_and_space_null_fixes_it(capsys):
    """--set train.lr on a space that searches train.lr had no effect: every trial replaced it with its own value."""
    assert tune.main(["--space", "demo", "--dry-run", "--set", "train.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "--set train.lr=1e-3 would have no effect: " in err and "demo.yaml searches train.lr (space.train.lr)" in err
    assert "--set space.train.lr=null" in err
    assert tune.main(["--space", "demo", "--dry-run", "--set", "train.lr=1e-3", "--set", "space.train.lr=null"]) == 0
    out = capsys.readouterr().out
    searched = yaml.safe_load(out.split("# search space")[1].split("# resources per trial")[0])
    assert "lr: 0.001" in out and "train.lr" not in searched and "model.dropout" in searched


@pytest.mark.parametrize(
    ("total", "concurrent", "expected", "warnings"),
    [
        (2.0, 1, 1, []),  # the demo: 0.6 CPU per trial leaves Ray Data a whole CPU; 2 threads on 2 cores
        (2.0, 2, 1, ["running 1 at a time"]),  # two trials would leave Ray Data 0.8 CPU
        (4.0, 4, 4, ["8 torch threads on the cluster's 4 CPUs"]),  # 4 trials fit, but 4 x 2 threads do not
        (16.0, 4, 4, []),
    ],
)
def test_fit_concurrency_caps_trials_and_warns_about_threads(capsys, total, concurrent, expected, warnings):
    cfg = config.load("demo", {"resources.max_concurrent_trials": concurrent})
    tune.fit_concurrency(cfg, total=total, fixed=True)  # a Ray this process started: no node will join
    assert cfg.resources.max_concurrent_trials == expected
    err = capsys.readouterr().err
    assert err.count("warning:") == len(warnings), err
    for needle in warnings:
        assert needle in err


def test_fit_concurrency_refuses_a_trial_that_leaves_ray_data_no_cpu():
    cfg = config.load("demo", {"resources.cpus_per_worker": 1.5})
    with pytest.raises(ValueError, match="less than one CPU"):
        tune.fit_concurrency(cfg, total=2.0, fixed=True)


def test_fit_concurrency_for_the_train_command_counts_no_trial_actor_and_caps_nothing(capsys):
    cfg = config.load("demo", {"resources.cpus_per_worker": 1.0, "resources.max_concurrent_trials": 4})
    tune.fit_concurrency(cfg, total=2.0, single_run=True, fixed=True)  # 1 CPU held, 1 left to Ray Data: fits
    assert cfg.resources.max_concurrent_trials == 4  # the config is recorded as written
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="one run reserves 1.5 CPUs"):
        cfg = config.load("demo", {"resources.cpus_per_worker": 1.5})
        tune.fit_concurrency(cfg, total=2.0, single_run=True, fixed=True)


@pytest.mark.parametrize(
    ("total", "single_run", "snapshot"),
    [
        # adamw (0.1 + 1 x 4 CPUs a trial, 4 at a time) on KubeRay's head-only RayCluster (CPU limit 16): the cap
        # from this snapshot was 3 trials for the whole sweep, although the autoscaler adds up to 8 GPU pods.
        (16.0, False, "4 concurrent trials × 4.1 CPUs"),
        (32.0, False, None),  # the launchers' head: 4 fit anyway
        (2.0, False, "one trial reserves 4.1 CPUs of the cluster's 2"),  # a small head: not refused either
        (2.0, True, "one run reserves 4 CPUs of the cluster's 2"),
    ],
)
def test_fit_concurrency_on_a_joined_cluster_warns_without_capping(capsys, monkeypatch, total, single_run, snapshot):
    from ray._private import state

    monkeypatch.setattr(cli, "_STARTED_HERE", False)  # joined with --address or through RAY_ADDRESS
    # Ray holds the autoscaler's config: up to 8 GPU nodes of 16 CPUs beside the head.
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 144, "GPU": 8})
    cfg = config.load("adamw")
    tune.fit_concurrency(cfg, total=total, single_run=single_run)
    assert cfg.resources.max_concurrent_trials == 4
    err = capsys.readouterr().err
    if snapshot is None:
        assert "warning" not in err
        return
    assert err.count("warning:") == 1 and snapshot in err
    assert "may add nodes" in err and "gpus_per_worker=0" not in err
    # The same snapshot on a Ray this process started (nothing will join) caps or refuses, as before.
    monkeypatch.setattr(cli, "_STARTED_HERE", True)
    cfg = config.load("adamw")
    if total == 16.0:
        tune.fit_concurrency(cfg, total=total, single_run=single_run)
        assert cfg.resources.max_concurrent_trials == 3
    else:
        with pytest.raises(ValueError, match="less than one CPU"):
            tune.fit_concurrency(cfg, total=total, single_run=single_run)


@pytest.mark.parametrize("config_record", [None, RuntimeError("not connected")])
def test_fit_concurrency_on_a_joined_cluster_that_cannot_grow_caps_as_on_its_own(monkeypatch, capsys, config_record):
    """A static cluster joined with --address (or one Ray cannot be asked about) has no autoscaler to add CPUs: a
    sweep that leaves Ray Data less than a CPU there hangs, so the cap holds as on a Ray this process started."""
    from ray._private import state

    def record():
        if isinstance(config_record, Exception):
            raise config_record
        return config_record

    monkeypatch.setattr(cli, "_STARTED_HERE", False)
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", record)
    assert cli.cluster_is_fixed()
    cfg = config.load("adamw")
    tune.fit_concurrency(cfg, total=16.0)
    assert cfg.resources.max_concurrent_trials == 3
    assert "running 3 at a time" in capsys.readouterr().err


CPU_NODE = {"CPU": 2.0}
GPU_NODE = {"CPU": 16.0, "GPU": 1.0}


@pytest.mark.parametrize(
    ("overrides", "nodes", "problem"),
    [
        ({}, [CPU_NODE], None),  # the demo on the 2-core machine
        ({"resources.gpus_per_worker": 1}, [CPU_NODE], "this machine has 2 CPUs and 0 GPUs, room for 0"),
        ({"resources.cpus_per_worker": 4}, [CPU_NODE], "1 Train worker(s) of 4 CPUs each"),
        ({"resources.gpus_per_worker": 1, "resources.cpus_per_worker": 4}, [CPU_NODE, GPU_NODE], None),
        # Two 1-GPU workers need two such nodes; a 2-GPU worker needs both GPUs on one node.
        ({"resources.gpus_per_worker": 1, "resources.num_workers": 2}, [CPU_NODE, GPU_NODE], "room for 1"),
        ({"resources.gpus_per_worker": 1, "resources.num_workers": 2}, [GPU_NODE, GPU_NODE], None),
        ({"resources.gpus_per_worker": 2}, [GPU_NODE, GPU_NODE], "the cluster's 2 nodes have 32 CPUs and 2 GPUs"),
        # Two ranks on one GPU: gloo takes it (NCCL refuses a duplicate GPU, so the config refuses it with nccl).
        ({"resources.gpus_per_worker": 0.5, "resources.num_workers": 2, "resources.backend": "gloo"}, [GPU_NODE], None),
    ],
)
def test_check_placement_refuses_workers_no_node_can_host(overrides, nodes, problem, capsys):
    cfg = config.load("demo", overrides)
    if problem is None:
        assert cli.check_placement(cfg, nodes=nodes, fixed=True) == []
        return
    # A cluster this process started never grows: an error that names the keys.
    with pytest.raises(ValueError, match="resources.gpus_per_worker") as raised:
        cli.check_placement(cfg, nodes=nodes, fixed=True)
    assert problem in str(raised.value)
    no_gpu_asked_for_one = cfg.resources.gpus_per_worker > 0 and not any("GPU" in n for n in nodes)
    assert ("set resources.gpus_per_worker=0" in str(raised.value)) == no_gpu_asked_for_one
    # A cluster it joined may grow (an autoscaler adding GPU nodes): a warning, and the run waits.
    (warned,) = cli.check_placement(cfg, nodes=nodes, fixed=False)
    assert problem in warned and "waits until nodes with these resources join" in warned
    assert "gpus_per_worker=0" not in warned  # GPU nodes may still come: no advice to train on CPUs
    assert capsys.readouterr().err.count("warning:") == 1


def _joined_cluster(monkeypatch, labels: dict, config_record):
    """A joined cluster of one CPU node with these labels, for which Ray records ``config_record``."""
    import ray
    from ray._private import state

    def record():
        if isinstance(config_record, Exception):
            raise config_record
        return config_record

    node = {"Alive": True, "Resources": dict(CPU_NODE), "Labels": {"ray.io/node-id": "ab12", **labels}}
    monkeypatch.setattr(cli, "_STARTED_HERE", False)
    monkeypatch.setattr(ray, "nodes", lambda: [node, {"Alive": False, "Labels": {cli.GROWS_LABEL: "true"}}])
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", record)


@pytest.mark.parametrize(
    ("labels", "config_record", "grows"),
    [
        ({}, None, False),  # a static cluster joined with --address: Ray Train would wait for a GPU node forever
        ({}, RuntimeError("not connected"), False),
        ({cli.GROWS_LABEL: "false"}, None, False),
        ({cli.GROWS_LABEL: "true"}, None, True),  # the cluster/ configs' head (Ray 2.60 records no config)
        ({}, {"CPU": 64, "GPU": 8}, True),  # an autoscaler that reports its config (autoscaler v2, later Rays)
    ],
)
def test_check_placement_on_a_joined_cluster_refuses_only_where_no_node_can_join(
    monkeypatch, capsys, labels, config_record, grows
):
    _joined_cluster(monkeypatch, labels, config_record)
    assert cli.cluster_is_fixed() is not grows
    cfg = config.load("demo", {"resources.gpus_per_worker": 1})
    if grows:
        (warned,) = cli.check_placement(cfg)
        assert "waits until nodes with these resources join" in warned
        assert capsys.readouterr().err.count("warning:") == 1
    else:
        with pytest.raises(ValueError, match=f"no node of this cluster is labelled {cli.GROWS_LABEL}=true") as raised:
            cli.check_placement(cfg)
        assert "set resources.gpus_per_worker=0" in str(raised.value)
    # fit_concurrency asks the same question: 16 CPUs hold 3 adamw trials, which it caps only where none can join.
    cfg = config.load("adamw")
    tune.fit_concurrency(cfg, total=16.0)
    assert (cfg.resources.max_concurrent_trials == 3) is not grows


@pytest.mark.parametrize(
    ("split", "candidates", "has_test", "expected"),
    [
        # The demo's validation figures of 2026-12-06: picked among 13 trial-epochs (its test AUC was 0.502).
        ({"auc": 0.594, "auc_ci95": [0.520, 0.672]}, 13, True, ["best of 13"]),
        ({"auc": 0.594, "auc_ci95": [0.480, 0.672]}, 13, False, ["best of 13", "pass --test", "includes 0.5"]),
        ({"auc": 0.91, "auc_ci95": [0.86, 0.95]}, 1, True, []),
        ({"auc": 0.30, "auc_ci95": [0.21, 0.40]}, 1, True, ["below 0.5"]),
        ({"auc": 0.91}, 4, True, ["best of 4"]),  # no bootstrap: nothing said about chance
        ({"auc": None, "auc_reason": "one class"}, 4, True, []),
    ],
)
def test_auc_caveats(split, candidates, has_test, expected):
    lines = tune.auc_caveats(split, candidates, has_test)
    assert len(lines) == len([e for e in expected if e != "pass --test"])
    text = " | ".join(lines)
    for needle in expected:
        assert needle in text
    # An interval holding 0.5 shows no evidence of beating chance; it does not show the model is no better than it.
    assert "no better than chance" not in text
    assert ("includes 0.5: no evidence of better than chance" in text) == ("includes 0.5" in expected)
    assert ("the test AUC below is not" in text) == (candidates > 1 and has_test and split["auc"] is not None)


@pytest.mark.parametrize(
    ("override", "needle"),
    [("train.lrr=1", "train.lrr"), ("model.dropout=2", "model.dropout"), ("train.sampler=nope", "train.sampler")],
)
def test_bad_override_names_the_key(override, needle):
    proc = run_module("mammo_ray.tune", "--space", "demo", "--dry-run", "--set", override)
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_a_cache_smaller_than_the_image_size_is_refused_before_ray(prepared_data, tmp_path):
    # prepared_data's cache holds 64×48 images; a sweep at 128×96 would upsample them without a word.
    results = tmp_path / "results"
    proc = run_module(
        "mammo_ray.tune",
        "--space",
        "demo",
        "--train",
        prepared_data["train"],
        "--valid",
        prepared_data["valid"],
        "--results",
        str(results),
        "--set",
        "data.image_size=[128,96]",
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{prepared_data['train']}: " in proc.stderr and "pixel-cache images of 64×48" in proc.stderr
    assert "smaller than data.image_size 128×96" in proc.stderr and "--size 128 96" in proc.stderr
    assert "Ray dashboard" not in proc.stdout  # Ray never started
    assert not results.exists()


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
    # Every metric that search.metric may name is in every trial's per-epoch report.
    for result in experiment.glob("trial_function_*/result.json"):
        report = json.loads(result.read_text().splitlines()[0])
        assert set(config.SELECTION_METRICS) <= set(report), result.parent.name

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
    # The test split is scored at the validation's operating points, not at points fitted on its own labels.
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert metrics["test"]["operating_points"] == "from the validation split"
    provenance = thresholds["provenance"]
    assert provenance["fitted_on"] == "validation" and provenance["epoch"] == metrics["selected"]["epoch"]
    assert provenance["n_images"] == metrics["val"]["n_images"]
    for name in ("youden", "spec0.90"):
        if thresholds[name]["threshold"] is not None:
            assert metrics["test"][f"threshold@{name}"] == pytest.approx(thresholds[name]["threshold"])
    assert export.main(["--experiment", str(results / "smoke"), "--metric", "nosuch"]) == 2


def test_export_picks_the_direction_of_the_metric_and_refuses_the_opposite(smoke_sweep, tmp_path, capsys):
    """--metric val_loss without --mode took the sweep's max and exported the highest loss."""
    from mammo_ray import export

    experiment = smoke_sweep / "results" / "smoke"
    table = export.find_checkpoints(experiment)
    out = tmp_path / "by_loss"
    assert export.main(["--experiment", str(experiment), "--metric", "val_loss", "--out", str(out),
                        "--bootstrap", "0", "--no-test"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected"]["report"]["val_loss"] == pytest.approx(table["val_loss"].min())
    assert "test" not in metrics and not (out / "test_predictions.csv").exists()
    for argv, needle in (
        (["--metric", "val_auc", "--mode", "min"], "--mode min would export the worst val_auc"),
        (["--metric", "train_loss"], "--metric train_loss: give --mode max or min"),
    ):
        assert export.main(["--experiment", str(experiment), "--out", str(tmp_path / "x"), *argv]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        export.main(["--experiment", str(experiment), "--bootstrap", "-5"])


def test_export_refuses_an_out_folder_that_is_not_a_bundle(smoke_sweep, tmp_path, capsys):
    """--out into a folder of the user's replaced its config.yaml and deleted its plots/; --out <experiment> lost
    the sweep's search space and plots."""
    from mammo_ray import export

    experiment = smoke_sweep / "results" / "smoke"
    user = tmp_path / "mine"
    (user / "plots").mkdir(parents=True)
    (user / "notes.txt").write_text("reading notes")
    (user / "plots" / "figure.png").write_bytes(b"png")
    sweep_config = (experiment / "config.yaml").read_bytes()
    for out in (user, experiment):
        assert export.main(["--experiment", str(experiment), "--out", str(out), "--no-test", "--bootstrap", "0"]) == 2
        assert "is not empty and holds no bundle" in capsys.readouterr().err
    assert (user / "plots" / "figure.png").is_file() and (user / "notes.txt").is_file()
    assert (experiment / "config.yaml").read_bytes() == sweep_config and (experiment / "plots").is_dir()


def test_export_checks_the_test_manifest_and_records_absolute_paths(smoke_sweep, tmp_path, monkeypatch, capsys):
    from mammo_ray import export

    results = smoke_sweep / "results"
    swept = json.loads((results / "smoke" / "manifests.json").read_text())
    # A --test drawn from the training rows is refused: the card would call it held out.
    leak = tmp_path / "leak.parquet"
    train = pd.read_parquet(swept["train"]).head(6)
    cache_files = [str((Path(swept["train"]).parent / f).resolve()) for f in train["cache_file"]]
    train.assign(split="test", cache_file=cache_files).to_parquet(leak)
    assert export.main(["--experiment", str(results / "smoke"), "--test", str(leak), "--out", str(tmp_path / "a")]) == 2
    assert "appear in both train and test" in capsys.readouterr().err and not (tmp_path / "a").exists()
    # A sweep whose recorded test manifest has moved: named, with the way out.
    moved = tmp_path / "moved"
    shutil.copytree(results / "smoke", moved, ignore=shutil.ignore_patterns("best"))
    (moved / "manifests.json").write_text(json.dumps({**swept, "test": str(tmp_path / "gone.parquet")}))
    assert export.main(["--experiment", str(moved), "--bootstrap", "0"]) == 2
    assert "gone.parquet" in capsys.readouterr().err
    # Relative --experiment: the bundle records where the checkpoint is, not where export ran; folders as mkdir.
    monkeypatch.chdir(tmp_path)
    assert export.main(["--experiment", "moved", "--no-test", "--bootstrap", "0"]) == 0
    recorded = json.loads((moved / "best" / "metrics.json").read_text())["selected"]["checkpoint"]
    assert Path(recorded).is_absolute() and Path(recorded).is_dir()
    card = (moved / "best" / "MODEL_CARD.md").read_text()  # re-exported: the sweep's data, as tune's card has it
    assert "| train |" in card and "| valid |" in card and "| test |" not in card
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert (moved / "best").stat().st_mode & 0o777 == 0o777 & ~umask
    assert export.main(["--experiment", "nowhere"]) == 2
    assert "--experiment nowhere: no such folder" in capsys.readouterr().err


def test_a_bundle_replaced_beside_a_train_run_loses_the_files_it_no_longer_writes(tmp_path):
    from mammo_ray import export

    out = tmp_path / "run"
    (out / "ray" / "run-1").mkdir(parents=True)
    for name in ("model.safetensors", "metrics.json", "test_predictions.csv", "results_last_old.tsv"):
        (out / name).write_text("old")
    staging = tmp_path / "staging"
    (staging / "plots").mkdir(parents=True)
    for name in ("model.safetensors", "metrics.json"):
        (staging / name).write_text("new")
    export.check_bundle_folder(out)
    export._swap_into_place(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.safetensors", "plots", "ray"]
    assert (out / "model.safetensors").read_text() == "new" and (out / "ray" / "run-1").is_dir()


def test_export_refuses_a_test_manifest_whose_cache_is_smaller_than_the_model_input(smoke_sweep, tmp_path, capsys):
    """Re-export with --test checks the cache size as train, tune and predict do: nothing is written."""
    from mammo_ray import export

    results = smoke_sweep / "results"
    cfg = yaml.safe_load((results / "smoke" / "best" / "config.yaml").read_text())
    height, width = cfg["data"]["image_size"]
    source = Path(json.loads((results / "smoke" / "manifests.json").read_text())["test"])
    test = pd.read_parquet(source)
    assert (test["cache_height"] >= height).all()  # the sweep's own cache passes
    small = tmp_path / "small_test.parquet"
    cache_files = [str((source.parent / f).resolve()) for f in test["cache_file"]]  # the copy lives elsewhere
    test.assign(cache_height=height // 2, cache_file=cache_files).to_parquet(small)
    out = tmp_path / "bundle"
    code = export.main(["--experiment", str(results / "smoke"), "--test", str(small), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(small) in err and f"smaller than data.image_size {height}×{width}" in err
    assert f"--size {height} {width}" in err and "--test" in err
    assert not out.exists() and not list(tmp_path.glob(".bundle.*"))


# --------------------------------------------------------------------------------------------------
# --storage: a local/NFS path or a URI (s3:// against a local moto server; gs:// has no local server).

S3_ENV = {
    "AWS_ACCESS_KEY_ID": KEY,
    "AWS_SECRET_ACCESS_KEY": KEY,
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
MINIO = "?endpoint_override=http%3A%2F%2Fminio%3A9000&scheme=http"


@pytest.mark.parametrize(
    ("storage_arg", "experiment", "out_dir"),
    [
        (None, "{results}/sweep", "{results}/sweep"),
        ("{tmp}/nfs/mammo-ray", "{tmp}/nfs/mammo-ray/sweep", "{tmp}/nfs/mammo-ray/sweep"),
        ("s3://bucket/mammo-ray", "s3://bucket/mammo-ray/sweep", "{results}/sweep"),
        (f"s3://bucket/mammo-ray{MINIO}", f"s3://bucket/mammo-ray/sweep{MINIO}", "{results}/sweep"),
        ("gs://bucket/a/", "gs://bucket/a/sweep", "{results}/sweep"),
    ],
)
def test_experiment_path_for_local_storage_and_uris(tmp_path, storage_arg, experiment, out_dir):
    """Tune and Train write to <storage>/<name>; optuna.db and the other driver outputs need a local folder."""
    from mammo_ray import config

    cfg = config.load("demo", {"name": "sweep"})
    results = tmp_path / "results"

    def fill(text: str) -> str:
        return text.format(results=results.resolve(), tmp=tmp_path)

    location = tune.experiment_path(cfg, results, fill(storage_arg) if storage_arg else None)
    assert str(location) == fill(experiment)  # a URI is never folded into a path ("s3:/bucket/...")
    assert isinstance(location, str) == ("://" in experiment)
    assert tune.output_dir(cfg, results, fill(storage_arg) if storage_arg else None) == Path(fill(out_dir))


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in S3_ENV.items():
            patch.setenv(key, value)
        server = LocalS3()
        for bucket in ("data", "runs"):
            server.make_bucket(bucket)
        yield server
        server.stop()


@pytest.mark.parametrize(
    ("location", "needle"),
    [
        ("s3://runs/mammo-ray?bogus=1", "--storage s3://runs/mammo-ray?bogus=1: cannot use this location"),
        ("{nobucket}", "bucket 'nobucket' does not exist"),
    ],
)
def test_unusable_storage_stops_before_ray(s3, tmp_path, location, needle):
    location = location.format(nobucket=s3.uri("nobucket/mammo-ray", credentials=True))
    proc = run_module("mammo_ray.tune", "--space", "demo", "--storage", location, "--results", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and f"{KEY}:{KEY}@" not in proc.stderr
    assert "Ray dashboard" not in proc.stdout
    assert not (tmp_path / "r").exists()


def test_existing_sweep_on_the_uri_is_not_overwritten(s3, tmp_path, capsys):
    s3.fs.open_output_stream("runs/taken/done/leaderboard.csv").close()
    storage_uri = s3.uri("runs/taken")
    assert tune.main(["--space", "demo", "--name", "done", "--storage", storage_uri, "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{s3.uri('runs/taken/done')} already holds a sweep named 'done'" in err and "--resume" in err


def test_sweep_files_for_a_uri_experiment_go_to_both_homes_without_credentials(s3, tmp_path):
    from mammo_ray import config, storage

    cfg = config.load("demo", {"name": "files"})
    experiment = s3.uri("runs/files/files", credentials=True)
    manifests = {"train": s3.uri("data/m/train.parquet", credentials=True), "valid": "/nfs/valid.parquet", "test": None}
    tune.write_sweep_files(cfg, manifests, experiment, tmp_path / "files")
    recorded = {"train": s3.uri("data/m/train.parquet"), "valid": "/nfs/valid.parquet", "test": None}
    assert json.loads((tmp_path / "files" / "manifests.json").read_text()) == recorded
    assert json.loads((tmp_path / "files" / "storage.json").read_text()) == {"experiment": s3.uri("runs/files/files")}
    assert json.loads(s3.fs.open_input_file("runs/files/files/manifests.json").read()) == recorded
    assert config.load(tmp_path / "files" / "config.yaml").name == "files"
    assert "name: files" in storage.read_text(storage.join(experiment, "config.yaml"))
    # A local experiment folder is the driver's folder: no pointer, nothing elsewhere.
    tune.write_sweep_files(cfg, manifests, tmp_path / "local", tmp_path / "local")
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["config.yaml", "manifests.json"]


@pytest.fixture(scope="module")
def s3_sweep(ray_session, prepared_data, s3, tmp_path_factory):
    """A one-trial smoke sweep with manifests, pixel cache and --storage on S3; the driver's outputs stay local.

    About 30-60 s on 2 CPUs (Tune, Train and Ray Data start-up dominate); CI runs it (issue 7 asks for it there).
    """
    root = tmp_path_factory.mktemp("s3sweep")
    s3.upload(Path(prepared_data["train"]).parent, "data/prep")
    data_before = s3.files("data/prep")
    # Credentials in the URIs: Ray's workers keep the environment of the ray.init that started them.
    uri = {role: s3.uri(f"data/prep/{role}.parquet", credentials=True) for role in ("train", "valid", "test")}
    code = tune.main(
        ["--space", "demo", "--smoke-test", "--num-samples", "1", "--name", "s3smoke",
         "--results", str(root / "results"), "--storage", s3.uri("runs/mammo-ray", credentials=True),
         "--train", uri["train"], "--valid", uri["valid"], "--test", uri["test"]]
    )  # fmt: skip
    assert code == 0
    return {"out": root / "results" / "s3smoke", "data_before": data_before, "experiment": "runs/mammo-ray/s3smoke"}


def test_s3_sweep_keeps_checkpoints_on_the_bucket_and_driver_outputs_local(s3, s3_sweep, prepared_data, capsys):
    out, experiment = s3_sweep["out"], s3_sweep["experiment"]
    # The driver's folder: SQLite study, leaderboard, plots, the exported bundle, and where the rest went.
    for name in ("config.yaml", "manifests.json", "optuna.db", "leaderboard.csv", "storage.json", "best/metrics.json"):
        assert (out / name).is_file(), name
    assert any((out / "plots").glob("*.png"))
    assert not (out / "train_runs").exists() and not list(out.glob("trial_function_*"))
    pointer = json.loads((out / "storage.json").read_text())["experiment"]
    assert pointer == s3.uri(experiment)  # without the key pair
    assert all(f"{KEY}:{KEY}@" not in (out / name).read_text() for name in ("manifests.json", "best/metrics.json"))
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    assert len(board) == 1 and board.at[0, "status"] == "TERMINATED"

    # The bucket: Tune's trial folder and state, each trial's Train run with its checkpoints, and the sweep files.
    files = s3.files(experiment)
    assert {"config.yaml", "manifests.json", "leaderboard.csv"} <= set(files)
    assert any(f.startswith("trial_function_") and f.endswith("/progress.csv") for f in files)
    assert any(f.startswith("experiment_state") for f in files)
    trial = board.at[0, "trial_id"]
    assert f"train_runs/trial_{trial}/config.yaml" in files
    checkpoint = [
        f for f in files if f.startswith(f"train_runs/trial_{trial}/checkpoint_") and f.endswith("/report.json")
    ]
    assert len(checkpoint) == 1
    from ray.tune import Tuner

    assert Tuner.can_restore(s3.uri(experiment, credentials=True))  # what --resume checks
    assert tune.unfinished_trials(s3.uri(experiment, credentials=True)) == {}
    assert "cannot read the sweep state" not in capsys.readouterr().err

    # best/ is that checkpoint, downloaded; val and test pixels were read from the bucket.
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["selected"]["checkpoint"] == s3.uri(f"{experiment}/{checkpoint[0].rsplit('/', 1)[0]}")
    val = pd.read_csv(out / "best" / "val_predictions.csv")
    assert sorted(val["image_id"].astype(str)) == sorted(pd.read_parquet(prepared_data["valid"])["image_id"])
    test = pd.read_csv(out / "best" / "test_predictions.csv")
    assert sorted(test["image_id"].astype(str)) == sorted(pd.read_parquet(prepared_data["test"])["image_id"])
    assert s3.files("data/prep") == s3_sweep["data_before"]  # nothing written into the data folder


def test_export_reexports_an_s3_sweep_from_the_uri_and_from_the_pointer(s3, s3_sweep, tmp_path):
    from mammo_ray import export

    uri = s3.uri(s3_sweep["experiment"])
    by_loss = tmp_path / "by_loss"
    assert export.main(["--experiment", uri, "--metric", "val_loss", "--mode", "min", "--out", str(by_loss),
                        "--bootstrap", "20"]) == 0  # fmt: skip
    table = export.find_checkpoints(uri)
    metrics = json.loads((by_loss / "metrics.json").read_text())
    assert metrics["selected"]["report"]["val_loss"] == pytest.approx(table["val_loss"].min())
    assert "test" in metrics  # the test manifest recorded on the bucket (manifests.json), scored again
    # Through results/<name>/storage.json, by the sweep's own metric: one trial of one epoch, one checkpoint.
    again = tmp_path / "again"
    assert export.main(["--experiment", str(s3_sweep["out"]), "--out", str(again), "--bootstrap", "20"]) == 0
    assert len(table) == 1
    assert json.loads((again / "metrics.json").read_text())["selected"]["checkpoint"] == table.at[0, "checkpoint"]


def test_manifest_paths_are_made_absolute_for_the_trials(tmp_path, monkeypatch):
    """Tune runs each trial in its own folder: a manifest named relative to the driver's folder must reach the
    trials as an absolute path. URIs and unset roles stay as they are."""
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    cfg = config.load("demo", {"data.valid": "prep/valid.parquet"})
    args = SimpleNamespace(train="prep/../prep/train.parquet", valid=None, test="s3://bucket/test.parquet")
    assert cli.manifest_paths(cfg, args) == {
        "train": str(tmp_path / "prep" / "train.parquet"),
        "valid": str(tmp_path / "prep" / "valid.parquet"),  # from the space file, relative to the same folder
        "test": "s3://bucket/test.parquet",
    }
    assert cli.manifest_paths(config.load("demo"), SimpleNamespace())["train"] is None


def test_resolve_weights_makes_local_files_absolute_and_refuses_missing_ones_before_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    for name in ("a.safetensors", "b.pt"):
        (tmp_path / "w" / name).write_bytes(b"x")
    cfg = config.load("demo", {"model.pretrained": "w/a.safetensors"})
    cfg.space["model.pretrained"] = {"type": "choice", "values": ["w/a.safetensors", "w/b.pt", "timm:fb_in1k"]}
    cli.resolve_weights(cfg)
    assert cfg.model.pretrained == str(tmp_path / "w" / "a.safetensors")
    assert cfg.space["model.pretrained"]["values"] == [
        str(tmp_path / "w" / "a.safetensors"),
        str(tmp_path / "w" / "b.pt"),
        "timm:fb_in1k",  # a hub tag is not a file
    ]
    unset = config.load("demo")
    cli.resolve_weights(unset)
    assert unset.model.pretrained is None
    for value in ("w/missing.safetensors", "s3://bucket/a.safetensors"):
        with pytest.raises(config.ConfigError, match=r"model\.pretrained.*not found"):
            cli.resolve_weights(config.load("demo", {"model.pretrained": value}))


def test_tune_refuses_a_missing_weights_file_before_ray(tmp_path):
    proc = run_module("mammo_ray.tune", "--space", "demo", "--results", str(tmp_path), "--set",
                      f"model.pretrained={tmp_path / 'none.safetensors'}")  # fmt: skip
    assert proc.returncode == 2
    assert "model.pretrained" in proc.stderr and "none.safetensors" in proc.stderr
    assert "Ray dashboard" not in proc.stdout and not any(tmp_path.iterdir())


def test_a_relative_local_storage_reaches_the_sweep_as_an_absolute_path(tmp_path, monkeypatch):
    """Ray reads a relative storage_path as a URI without a scheme and failed after it had started (ArrowInvalid);
    tune makes a local --storage absolute first (URIs stay as they are: cli.absolute_path, test above)."""
    seen = {}

    def run_sweep(cfg, args, results, experiment, out_dir):
        seen.update(storage=args.storage, experiment=experiment, out_dir=out_dir)
        return 0

    monkeypatch.setattr(tune, "run_sweep", run_sweep)
    monkeypatch.chdir(tmp_path)
    assert tune.main(["--space", "demo", "--train", "t.parquet", "--valid", "v.parquet", "--storage", "store"]) == 0
    assert seen["storage"] == str(tmp_path / "store")
    assert seen["experiment"] == seen["out_dir"] == tmp_path / "store" / "demo"


@pytest.mark.parametrize(
    ("overrides", "space", "searched", "needle"),
    [
        ({}, {}, True, None),
        ({"model.backbone": "resnet50"}, {}, True, "model.backbone: unknown backbone 'resnet50'"),
        (
            {},
            {"model.backbone": {"type": "choice", "values": ["convnext_atto", "vit_b"]}},
            True,
            "space.model.backbone",
        ),
        ({"model.freeze_units": 30}, {}, False, "model.freeze_units: 30 freeze units, but convnext_atto has 18"),
        ({"model.freeze_units": 18}, {}, False, None),  # every unit, the head included: allowed
        # train ignores the space; tune checks the space's range in place of the fixed value it overrides.
        ({"model.freeze_units": 30}, {"model.freeze_units": {"type": "int", "low": 0, "high": 2}}, True, None),
        ({}, {"model.freeze_units": {"type": "int", "low": 0, "high": 41}}, True, "space.model.freeze_units: 41"),
        (
            {"model.backbone": "convnext_small"},
            {
                "model.freeze_units": {"type": "int", "low": 0, "high": 41},
                "model.backbone": {"type": "choice", "values": ["convnext_small", "convnext_tiny"]},
            },
            True,
            "but convnext_tiny has 24",
        ),
    ],
)
def test_check_model_refuses_backbones_and_freeze_depths_the_model_cannot_take(overrides, space, searched, needle):
    cfg = config.load("demo", overrides)
    cfg.space = {key: spec for key, spec in cfg.space.items() if key != "model.freeze_units"} | space
    if needle is None:
        cli.check_model(cfg, searched=searched)
    else:
        with pytest.raises(config.ConfigError, match=re.escape(needle)):
            cli.check_model(cfg, searched=searched)


@pytest.mark.parametrize(
    ("overrides", "searched", "warned"),
    [
        ({}, True, "space.model.freeze_units freezes up to 2 unit(s) of a randomly initialised model"),
        ({"model.freeze_units": 3}, False, "model.freeze_units freezes up to 3 unit(s)"),
        ({"model.freeze_units": 0}, False, None),
        ({"model.freeze_units": 3, "model.pretrained": "timm:convnext_atto.d2_in1k"}, False, None),
    ],
)
def test_freezing_a_randomly_initialised_model_is_warned_of(overrides, searched, warned, capsys):
    cli.check_model(config.load("demo", overrides), searched=searched)
    err = capsys.readouterr().err
    assert (warned in err) if warned else "randomly initialised" not in err


def test_check_model_matches_weights_files_against_every_build_before_ray(tmp_path, capsys):
    """A file of another architecture failed in every Train worker ("No tensor ... fits") after Ray's start-up;
    a file that fits in part loaded with a warning only the workers' logs showed."""
    import torch
    from safetensors.torch import save_file

    from mammo_ray import model as model_mod

    atto = model_mod.create_model("convnext_atto").state_dict()
    save_file({key: value.contiguous() for key, value in atto.items()}, tmp_path / "atto.safetensors")
    torch.save({"conv1.weight": torch.zeros(8, 1, 7, 7), "fc.weight": torch.zeros(1, 8)}, tmp_path / "resnet.pt")
    partial = {key: value for key, value in atto.items() if not key.startswith("stages.3.")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pt")

    def check(fixed, space=None, searched=True):
        cfg = config.load("demo", {"model.pretrained": str(tmp_path / fixed)})
        cfg.space = {key: spec for key, spec in cfg.space.items() if key != "model.pretrained"} | (space or {})
        cli.check_model(cfg, searched=searched)

    check("atto.safetensors")
    assert capsys.readouterr().err == ""
    with pytest.raises(config.ConfigError, match=r"model\.pretrained: No tensor in .*resnet\.pt fits convnext_atto"):
        check("resnet.pt")
    check("partial.pt")
    warning = capsys.readouterr().err
    assert "model.pretrained" in warning and "partial.pt" in warning and "missing in file: stages.3." in warning
    # The file's stem fits the patchify stem only: with the deep stem, a partial fit, still loadable.
    cfg = config.load("demo", {"model.pretrained": str(tmp_path / "atto.safetensors"), "model.stem": "deep"})
    cli.check_model(cfg, searched=False)
    assert "stem=deep" in capsys.readouterr().err
    # tune checks every file the space can draw; train ignores the space.
    space = {"model.pretrained": {"type": "choice", "values": [str(tmp_path / "atto.safetensors"),
                                                                 str(tmp_path / "resnet.pt")]}}  # fmt: skip
    with pytest.raises(config.ConfigError, match=r"space\.model\.pretrained: No tensor in .*resnet\.pt"):
        check("atto.safetensors", space)
    check("atto.safetensors", space, searched=False)
    # ... and every backbone it can draw the file into (convnext_femto's widths differ from atto's everywhere).
    space = {"model.backbone": {"type": "choice", "values": ["convnext_atto", "convnext_femto"]}}
    with pytest.raises(config.ConfigError, match=r"model\.pretrained: No tensor .* fits convnext_femto's backbone"):
        check("atto.safetensors", space)


def test_train_refuses_an_out_dir_of_the_users_before_ray(tmp_path, monkeypatch, capsys):
    from mammo_ray import train

    (tmp_path / "config.yaml").write_text("mine: true\n")
    monkeypatch.setattr(cli, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    assert train.main(["--config", "demo", "--out_dir", str(tmp_path)]) == 2
    assert "is not empty and holds no bundle (config.yaml)" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"


def test_train_refuses_a_weights_file_of_another_architecture_before_ray(tmp_path, monkeypatch, capsys):
    import torch

    from mammo_ray import train

    torch.save({"conv1.weight": torch.zeros(8, 1, 7, 7)}, tmp_path / "resnet.pt")
    monkeypatch.setattr(cli, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    assert train.main(["--config", "demo", "--set", f"model.pretrained={tmp_path / 'resnet.pt'}"]) == 2
    assert "model.pretrained: No tensor in" in capsys.readouterr().err


def test_the_reference_freeze_depth_on_the_default_backbone_stops_train_before_ray(monkeypatch, capsys):
    """Before, every Train worker raised "freeze units must be in [0, 18]" after Ray's start-up."""
    from mammo_ray import train

    monkeypatch.setattr(cli, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    argv = ["--train_csv_pth", "t.csv", "--valid_csv_pth", "v.csv", "--fine_tuning", "partial", "--upto_freeze", "30"]
    assert train.main(argv) == 2
    assert "model.freeze_units: 30 freeze units, but convnext_atto has 18" in capsys.readouterr().err


def _reference_csvs(folder: Path, labels: dict[str, list[int]]) -> dict[str, Path]:
    """The reference's CSVs (path_eq, cancer, datasettype, patient_id), one per split, over empty image files."""
    paths = {}
    for split, cancers in labels.items():
        rows = []
        for i, cancer in enumerate(cancers):
            name = f"{split}_p{i}_LCC.png"
            (folder / name).touch()
            rows.append({"path_eq": name, "cancer": cancer, "datasettype": "T", "patient_id": f"{split}_p{i}"})
        paths[split] = folder / f"{split}.csv"
        pd.DataFrame(rows).to_csv(paths[split], index=False)
    return paths


def test_train_checks_the_test_manifest_beside_the_reference_csvs_before_ray(tmp_path, monkeypatch, capsys):
    """With --train_csv_pth/--valid_csv_pth, --test was read but never validated: a bad label failed the export
    after the whole run."""
    from mammo_ray import train

    csvs = _reference_csvs(tmp_path, {"train": [0, 1, 0], "valid": [1, 0]})
    (tmp_path / "te.png").touch()
    test = tmp_path / "te_bad.csv"
    test.write_text("image_id,path,label,patient_id,exam_id,laterality,view,dataset\nte,te.png,yes,te_p,te_e,L,CC,T\n")
    monkeypatch.setattr(cli, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setattr(train, "run_single", lambda *a, **k: pytest.fail("training started"))
    argv = ["--train_csv_pth", str(csvs["train"]), "--valid_csv_pth", str(csvs["valid"]), "--test", str(test)]
    assert train.main([*argv, "--out_dir", str(tmp_path / "out")]) == 2
    assert f"manifest {test}: 1 label(s) outside {{0, 1}}: row 1 (image_id te, label 'yes')" in capsys.readouterr().err


def _labelled_manifests(folder: Path, labels: dict[str, list[int]]) -> dict[str, Path]:
    """One Parquet manifest per split, one patient per image, over empty image files."""
    paths = {}
    for split, values in labels.items():
        rows = []
        for i, label in enumerate(values):
            image = folder / f"{split}_{i}.png"
            image.touch()
            ids = dict(image_id=f"{split}_{i}", patient_id=f"{split}_p{i}", exam_id=f"{split}_e{i}")
            rows.append(dict(ids, path=str(image), label=label, laterality="L", view="CC", dataset="T"))
        paths[split] = folder / f"{split}.parquet"
        pd.DataFrame(rows).to_parquet(paths[split])
    return paths


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize(("labels", "role"), [({"train": [0, 0, 0], "valid": [0, 1]}, "train"),
                                              ({"train": [0, 1, 1], "valid": [1, 1]}, "valid")])  # fmt: skip
def test_a_split_of_one_class_is_refused_before_ray(tmp_path, monkeypatch, capsys, command, labels, role):
    """One class in training failed in every Train worker after Ray's start-up ("the weighted sampler needs both
    classes"), naming no file; one class in validation left val_auc undefined, so no epoch could be exported."""
    from mammo_ray import train

    paths = _labelled_manifests(tmp_path, labels)
    monkeypatch.setattr(cli, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setattr(train, "run_single", lambda *a, **k: pytest.fail("training started"))
    argv = ["--train", str(paths["train"]), "--valid", str(paths["valid"])]
    if command == "train":
        code = train.main([*argv, "--out_dir", str(tmp_path / "out")])
    else:
        code = tune.main([*argv, "--space", "demo", "--results", str(tmp_path / "results")])
    assert code == 2
    n, label = len(labels[role]), labels[role][0]
    err = capsys.readouterr().err
    assert f"manifest {paths[role]} ({role}): all {n} image(s) have label {label}" in err
    assert ("training needs both classes" if role == "train" else "search.metric val_auc is undefined") in err


def test_one_class_in_validation_is_a_warning_when_the_metric_stays_defined(tmp_path, monkeypatch, capsys):
    from mammo_ray import train

    paths = _labelled_manifests(tmp_path, {"train": [0, 1], "valid": [0, 0]})
    monkeypatch.setattr(train, "run_single", lambda *a, **k: 0)
    argv = ["--train", str(paths["train"]), "--valid", str(paths["valid"]), "--out_dir", str(tmp_path / "out")]
    assert train.main([*argv, "--set", "search.metric=val_loss", "--set", "search.mode=min"]) == 0
    err = capsys.readouterr().err
    assert f"warning: manifest {paths['valid']} (valid): all 2 image(s) have label 0; its AUCs are undefined" in err


@pytest.mark.parametrize(
    ("extra", "where"),
    [([], "train.csv (train): all 3 image(s) have label 0"), (["--data", "B"], "(valid): all 1 image(s) have label 1")],
)
def test_reference_csvs_and_subsets_of_one_class_are_refused_before_ray(tmp_path, monkeypatch, capsys, extra, where):
    from mammo_ray import train

    csvs = _reference_csvs(tmp_path, {"train": [0, 0, 0] if not extra else [0, 1, 0], "valid": [0, 1]})
    if extra:  # the first image of each split is data set A, the rest B: --data B leaves valid one positive
        for path in csvs.values():
            table = pd.read_csv(path)
            table["datasettype"] = ["A"] + ["B"] * (len(table) - 1)
            table.to_csv(path, index=False)
    monkeypatch.setattr(cli, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setattr(train, "run_single", lambda *a, **k: pytest.fail("training started"))
    argv = ["--train_csv_pth", str(csvs["train"]), "--valid_csv_pth", str(csvs["valid"]), *extra]
    assert train.main([*argv, "--out_dir", str(tmp_path / "out")]) == 2
    assert where in capsys.readouterr().err


def test_quiet_logging_hides_tensorboardx_renaming_every_metric_with_an_at_sign():
    """Without -v, each trial's first report printed four INFO lines from tensorboardX ("Summary name
    ray/tune/val_sensitivity@0.3 is illegal") into the sweep's terminal: 24 in the demo."""
    import logging

    cli.setup_logging(verbose=False)
    assert not logging.getLogger("tensorboardX.summary").isEnabledFor(logging.INFO)
    cli.setup_logging(verbose=True)
    assert logging.getLogger("tensorboardX.summary").isEnabledFor(logging.INFO)
    cli.setup_logging(verbose=False)


def test_the_console_script_names_an_unknown_command_and_the_closest_one(capsys):
    assert cli.main(["predcit"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'predcit'; did you mean predict?" in err and "usage: mammo-ray" in err
    assert cli.main(["--help"]) == 0 and "usage: mammo-ray" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_the_card_lists_undefined_metrics_of_each_data_set():
    """A data set without cancers had a row of n/a and no word why: only the split's own reasons were listed."""
    from mammo_ray import export, metrics

    frame = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(8)],
            "patient_id": [f"p{k}" for k in range(8)],
            "exam_id": [f"e{k}" for k in range(8)],
            "laterality": ["L", "R"] * 4,
            "dataset": ["A"] * 4 + ["B"] * 4,
            "label": [1, 0, 1, 0, 0, 0, 0, 0],
            "prob": [0.9, 0.2, 0.7, 0.4, 0.3, 0.1, 0.5, 0.6],
        }
    )
    card = export.model_card(config.load("demo"), {"val": metrics.compute_metrics(frame)}, None, {})
    assert "- val · B: `auc`: undefined: no positive cases in dataset B (n_images=4)" in card


def test_the_card_describes_the_cohort_the_selection_and_the_operating_points():
    """A reviewer missed prevalence, patients with cancer, exams and vendors; how many candidates the checkpoint
    was picked from; the operating points beside the spec0.90 column; and why prob is not a risk under a
    class-aware sampler."""
    from mammo_ray import export, metrics

    frame = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(8)],
            "patient_id": ["p1", "p1", "p2", "p2", "p3", "p3", "p1", "p4"],
            "exam_id": ["e1", "e1", "e2", "e2", "e3", "e3", "e1", "e4"],
            "laterality": ["L", "R"] * 4,
            "dataset": ["A"] * 6 + ["B"] * 2,  # B's p1 is another woman than A's p1
            "manufacturer": ["HOLOGIC"] * 5 + [None] * 3,
            "label": [1, 0, 0, 0, 1, 0, 0, 0],
            "prob": [0.9, 0.2, 0.7, 0.4, 0.3, 0.1, 0.5, 0.6],
        }
    )
    cfg = config.load("demo", {"train.sampler": "balanced"})
    results = {"val": metrics.compute_metrics(frame), "selected": {"metric": "val_auc", "candidates": 15}}
    card = export.model_card(cfg, results, {"valid": frame}, {})
    assert "| valid | 8 | 2 (25.0%) | 5 (2) | 5 | A (6), B (2) | HOLOGIC (5), unknown (3) |" in card
    assert "best of 15 trial-epochs by val_auc" in card
    assert "Training batches held about 50% positives (sampler balanced)" in card
    youden = results["val"]["threshold@youden"]
    assert f"| val | youden | {youden:.3f} |" in card
    assert "val · A" in card  # two data sets: each gets its row
    single = export.model_card(config.load("demo", {"train.sampler": "simple"}), results, None, {})
    assert "Training batches held" not in single


@pytest.mark.parametrize("augment_on", [True, False])
def test_the_card_says_which_views_are_flipped(augment_on: bool):
    """A reader of the card should know that MLO images were never trained upside down (pectoral at the bottom)."""
    from mammo_ray import augment, export, metrics

    frame = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(4)],
            "patient_id": [f"p{k}" for k in range(4)],
            "exam_id": [f"e{k}" for k in range(4)],
            "laterality": ["L", "R"] * 2,
            "dataset": ["A"] * 4,
            "label": [1, 0, 1, 0],
            "prob": [0.9, 0.2, 0.7, 0.4],
        }
    )
    cfg = config.load("demo", {"train.augment": augment_on})
    card = export.model_card(cfg, {"val": metrics.compute_metrics(frame)}, None, {})
    line = next(text for text in card.splitlines() if "Training augmentation:" in text)
    if not augment_on:
        assert "Training augmentation: off;" in line
        return
    flip = line[line.index("vertical flip only for") :]
    assert "never for MLO" in flip
    listed = {word for word in flip.split("never")[0].replace(",", " ").split() if word.isupper()}
    assert listed == set(augment.VERTICAL_FLIP_VIEWS), (
        f"the card lists {listed}, augment flips {augment.VERTICAL_FLIP_VIEWS}"
    )


def _women_with_left_cancers(women: int, has_cancer, prob) -> pd.DataFrame:
    """Predictions for ``women`` one-exam women of four images (two left, two right); the left breast of those for
    whom ``has_cancer(patient index)`` holds has cancer, and ``prob(labels)`` gives the scores."""
    n = women * 4
    patient = np.repeat(np.arange(women), 4)
    left = np.arange(n) % 4 < 2
    label = (has_cancer(patient) & left).astype(int)
    return pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(n)],
            "patient_id": patient.astype(str),
            "exam_id": patient.astype(str),
            "laterality": np.where(left, "L", "R"),
            "dataset": "A",
            "label": label,
            "prob": prob(label),
        }
    )


def _carded_splits(women: int, every: int, seed: int, bootstrap: int = 0) -> tuple[dict, dict, str]:
    """A validation and a test split of ``women`` women (every ``every``-th with a left cancer, scores drawn with
    ``seed``), scored as export does (test at the validation's operating points), and the demo card of both."""
    from mammo_ray import export, metrics

    rng = np.random.default_rng(seed)
    frames = [
        _women_with_left_cancers(
            women, lambda patient: patient % every == 0, lambda label: np.clip(rng.normal(0.3 + 0.2 * label, 0.1), 0, 1)
        )
        for _ in range(2)
    ]
    val = metrics.compute_metrics(frames[0], bootstrap=bootstrap)
    cuts = metrics.all_operating_points(frames[0])  # as export: per image and per exam
    test = metrics.compute_metrics(frames[1], bootstrap=bootstrap, cuts=cuts)
    return val, test, export.model_card(config.load("demo"), {"val": val, "test": test}, None, {})


def test_the_card_shows_no_zero_width_interval_and_marks_the_exact_one():
    """The card printed sensitivity 1.000 (1.000–1.000) from 4 women with cancer among 200."""
    from mammo_ray import export, metrics

    rng = np.random.default_rng(0)
    frame = _women_with_left_cancers(  # the first 4 of 200 women
        200,
        lambda patient: patient < 4,
        lambda label: np.where(label == 1, rng.uniform(0.35, 0.9, label.size), rng.uniform(0.0, 0.6, label.size)),
    )
    card = export.model_card(config.load("demo"), {"val": metrics.compute_metrics(frame, bootstrap=100)}, None, {})
    assert "1.000 (0.398–1.000)†" in card and "(1.000–1.000)" not in card
    assert "Clopper-Pearson's exact interval instead, marked †" in card
    assert "- val: `auc_ci95`: not reported: patients in this split: 4 with a positive image" in card


def test_the_card_labels_image_level_figures_and_gives_exam_level_ones_at_each_point():
    """The card's sens@0.3 / spec@0.3 were per image without saying so; per exam (a recall) specificity 0.296 was
    0.014 on the demo's validation."""
    from mammo_ray import export, metrics

    rng = np.random.default_rng(0)
    frame = _women_with_left_cancers(
        40, lambda patient: patient % 4 == 0, lambda label: np.clip(rng.normal(0.3 + 0.2 * label, 0.1), 0, 1)
    )
    results = {"val": metrics.compute_metrics(frame, threshold=0.35)}
    card = export.model_card(config.load("demo", {"train.threshold": 0.35}), results, None, {})
    assert "| image ROC-AUC | image PR-AUC | breast AUC | image sens@0.35 | image spec@0.35 |" in card
    assert "an exam is recalled when any of its images reaches the threshold" in card
    assert (
        "| split | point | threshold | image sensitivity | image specificity | exam sensitivity | exam specificity |"
        in card
    )
    val = results["val"]
    for label_text, key in (("0.35 (train.threshold)", "0.35"), ("0.3 (reference)", "0.3"), ("youden", "youden")):
        cut = 0.35 if key == "0.35" else 0.3 if key == "0.3" else val["threshold@youden"]
        row = (
            f"| val | {label_text} | {cut:.3f} | {val[f'sensitivity@{key}']:.3f} | {val[f'specificity@{key}']:.3f} | "
            f"{val[f'sensitivity_exam@{key}']:.3f} | {val[f'specificity_exam@{key}']:.3f} |"
        )
        assert row in card
    assert val["specificity_exam@0.35"] < val["specificity@0.35"]


def test_the_cards_operating_points_table_gives_the_test_intervals_at_the_validation_points():
    val, test, card = _carded_splits(40, 4, seed=1, bootstrap=200)
    low, high = test["sensitivity@youden_ci95"]
    row = (
        f"| test | youden | {test['threshold@youden']:.3f} | {test['sensitivity@youden']:.3f} ({low:.3f}–{high:.3f}) |"
    )
    assert row in card
    assert f"| val | youden | {val['threshold@youden']:.3f} | {val['sensitivity@youden']:.3f} |" in card  # fitted


def test_the_card_projects_each_test_point_to_a_screening_population():
    """A radiologist reads a point as a recall rate and a PPV1; the enriched split's own would mislead."""
    from mammo_ray import export

    val, test, card = _carded_splits(40, 4, seed=2)
    assert "projected to 6 cancers per 1,000 screening exams" in card
    assert f"The test split is enriched ({test['n_positive_exams'] / test['n_exams']:.1%} of its" in card
    sizes = test["images_per_exam"]
    if sizes["min"] == sizes["max"]:
        assert f"Each of its exams holds {sizes['min']} images" in card
    else:
        assert f"Its exams hold {sizes['min']}–{sizes['max']} images (median {sizes['median']:g})" in card
    assert "recall rate 5–12%, cancer detection at least 2.5 per 1,000, PPV1 3–8%" in card
    header = "| point | exam sensitivity | exam specificity | recall rate | cancers detected per 1,000 | PPV1 |"
    assert header in card

    def shown(key: str, spec: str) -> str:  # n/a where a point recalls no exam (no PPV1)
        value = test[key]
        return "n/a" if value is None else format(value, spec)

    for point in ("0.3", "youden", "spec0.90", "spec0.987", "exam_spec0.90", "exam_spec0.987"):
        row = (
            f"| {point} | {shown(f'sensitivity_exam@{point}', '.3f')} | {shown(f'specificity_exam@{point}', '.3f')} | "
            f"{shown(f'recall_rate_screening@{point}', '.1%')} | "
            f"{shown(f'cancer_detection_per_1000_screening@{point}', '.2f')} | {shown(f'ppv1_screening@{point}', '.2%')} |"
        )
        assert row in card, point
    # The exam-fitted points are in the operating-points table too, on both splits.
    assert f"| val | exam_spec0.90 | {val['threshold@exam_spec0.90']:.3f} |" in card
    assert f"| test | exam_spec0.90 | {test['threshold@exam_spec0.90']:.3f} |" in card
    # Without a test split the validation's points are projected, and the card says which split it used.
    card = export.model_card(config.load("demo"), {"val": val}, None, {})
    assert "The validation split is enriched" in card


def test_the_card_says_when_an_auc_interval_includes_chance():
    """The demo's card showed test AUC 0.432 (0.345–0.527) without a word on what the interval says of chance."""
    from mammo_ray import export

    def split(auc, ci):
        return {"auc": auc, "auc_ci95": ci, "n_images": 10, "n_positive": 2}

    results = {"val": split(0.601, [0.521, 0.678]), "test": split(0.432, [0.345, 0.527])}
    card = export.model_card(config.load("demo"), results, None, {})
    assert "The test ROC-AUC's 95% CI (0.345–0.527) includes 0.5: no evidence of better than chance." in card
    assert "validation ROC-AUC's 95% CI" not in card
    results["val"]["auc_ci95"] = [0.42, 0.48]
    card = export.model_card(config.load("demo"), results, None, {})
    assert "The validation ROC-AUC's 95% CI (0.420–0.480) lies below 0.5: worse than chance on this split." in card


def test_the_card_says_what_the_test_split_was_checked_against():
    from mammo_ray import export

    frame = pd.DataFrame({"patient_id": ["p"]})
    assert export._held_out(None) == ""
    assert export._held_out({"train": frame, "valid": frame, "test": frame}) == (
        " (checked to share no patient, exam or image with train and valid)"
    )
    assert "not with valid, whose manifest was not found" in export._held_out({"train": frame, "test": frame})
    assert export._held_out({"test": frame}).startswith(" (not checked for shared patients")


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_num_samples_below_one_is_refused_by_name(value, capsys):
    """--num-samples 0 silently kept the space's num_samples; -2 was blamed on the space file."""
    with pytest.raises(SystemExit):
        tune.build_parser().parse_args(["--space", "demo", "--num-samples", value])
    assert "--num-samples" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("views", "overrides", "warned"),
    [
        (["MLO", "MLO", "U"], {}, True),  # e.g. `seed` file names without a CC token
        (None, {}, True),  # no view column at all
        (["MLO", "CC"], {}, False),
        (["MLO", "U"], {"train.augment": False}, False),  # nothing is augmented: nothing to say
    ],
)
def test_a_training_manifest_whose_views_allow_no_flip_is_warned_about(views, overrides, warned, capsys):
    """The vertical flip is for CC-family views only; a manifest without one trained with no flip, unsaid."""
    train = pd.DataFrame(
        {"image_id": ["a", "b", "c"][: len(views or "abc")], "label": [0, 1, 0][: len(views or "abc")]}
    )
    if views is not None:
        train["view"] = views
    assert cli.warn_unflippable(config.load("demo", overrides), train) is warned
    err = capsys.readouterr().err
    assert ("no training image is flipped vertically" in err) is warned
    if warned and views is None:
        assert "missing (no view column)" in err


def test_the_screening_paragraph_says_how_many_images_an_exam_pools():
    from mammo_ray import export

    values = {"screening_prevalence": 0.006, "recall_rate_screening@0.3": 0.1, "n_exams": 10, "n_positive_exams": 2}
    pooled = export._screening_table({"test": {**values, "images_per_exam": {"min": 2, "median": 4.0, "max": 9}}})
    assert "Its exams hold 2–9 images (median 4); more than a screen's four or so" in "\n".join(pooled)
    single = export._screening_table({"test": {**values, "images_per_exam": {"min": 4, "median": 4.0, "max": 4}}})
    assert "Each of its exams holds 4 images;" in "\n".join(single)


def test_the_cards_screening_table_gives_the_test_intervals():
    """The projection's figures carry the patient-bootstrap intervals of metrics.json into the card."""
    _, test, card = _carded_splits(48, 3, seed=3, bootstrap=200)
    se_low, se_high = test["sensitivity_exam@spec0.90_ci95"]
    low, high = test["recall_rate_screening@spec0.90_ci95"]
    row = f"| spec0.90 | {test['sensitivity_exam@spec0.90']:.3f} ({se_low:.3f}–{se_high:.3f}) | "
    assert row in card
    assert f"{test['recall_rate_screening@spec0.90']:.1%} ({low:.1%}–{high:.1%})" in card
    assert "95% CIs from the same patient resamples" in card
