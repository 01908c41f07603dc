"""Tests for the pure parts of mammo_ray.train (no Ray): schedule, optimiser, the reference CLI mapping, resources."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from mammo_ray import config, train


def _lr(step: int, steps: int = 10, **kwargs: Any) -> float:
    kwargs.setdefault("epochs", 5)
    kwargs.setdefault("schedule", "cosine")
    return train.lr_multiplier(step, steps, **kwargs)


# --------------------------------------------------------------------------------------------------
# lr_multiplier


@pytest.mark.parametrize(("steps", "warmup"), [(10, 1.0), (10, 2.0), (4, 0.5), (1, 1.0), (100, 0.3)])
def test_warmup_ramps_up_to_one(steps: int, warmup: float) -> None:
    warmup_steps = round(warmup * steps)
    factors = [_lr(s, steps, warmup_epochs=warmup, epochs=10) for s in range(warmup_steps + 1)]
    assert factors[0] > 0, "the first step must not have a zero learning rate"
    assert all(b > a for a, b in zip(factors[:warmup_steps], factors[1:warmup_steps], strict=False))
    assert factors[warmup_steps - 1] == pytest.approx(1.0)
    assert factors[warmup_steps] == pytest.approx(1.0)  # the schedule proper starts at its peak


@pytest.mark.parametrize(("steps", "warmup"), [(10, 1.0), (4, 0.5), (3, 0.5), (10, 0.05)])
def test_multiplier_never_exceeds_one(steps: int, warmup: float) -> None:
    epochs = 4
    factors = [
        _lr(s, steps, epochs=epochs, schedule=schedule, warmup_epochs=warmup, decay_every=1)
        for schedule in ("cosine", "step", "constant")
        for s in range(epochs * steps)
    ]
    worst = max(factors)
    assert worst <= 1.0 + 1e-9, (
        f"BUG train.lr_multiplier: warm-up gives a factor of {worst:.3f} > 1 with {steps} steps per epoch and "
        f"warmup_epochs={warmup} (the demo uses 0.5): the ramp overshoots when warm-up is not a whole number of steps"
    )


@pytest.mark.parametrize(("epochs", "steps", "warmup"), [(5, 10, 0.0), (5, 10, 1.0), (1, 1, 0.0), (20, 3, 2.0)])
def test_cosine_reaches_zero_at_the_end(epochs: int, steps: int, warmup: float) -> None:
    factors = [_lr(s, steps, epochs=epochs, warmup_epochs=warmup) for s in range(epochs * steps + 1)]
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert factors[-2] < 0.1 or epochs * steps < 10
    after_warmup = factors[round(warmup * steps) :]
    assert all(b <= a + 1e-12 for a, b in zip(after_warmup, after_warmup[1:], strict=False)), "cosine must not rise"
    assert max(factors) <= 1.0 + 1e-12


def test_cosine_midpoint_is_one_half() -> None:
    assert _lr(25, 10, epochs=5) == pytest.approx(0.5)


def test_cosine_stays_at_zero_past_the_end() -> None:
    assert _lr(80, 10, epochs=5) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("decay_every", "multiplier", "expected"),
    [
        (2, 0.5, [1, 1, 0.5, 0.5, 0.25, 0.25]),
        (1, 0.1, [1, 0.1, 0.01, 0.001, 1e-4, 1e-5]),
        (3, 0.5, [1, 1, 1, 0.5, 0.5, 0.5]),
        (10, 0.5, [1, 1, 1, 1, 1, 1]),
        (0, 0.5, [1, 1, 1, 1, 1, 1]),  # no decay period: constant
    ],
)
def test_step_decay_multiplies_every_n_epochs(decay_every: int, multiplier: float, expected: list[float]) -> None:
    steps = 4
    for epoch, value in enumerate(expected):
        for step_in_epoch in (0, steps - 1):
            factor = _lr(
                epoch * steps + step_in_epoch,
                steps,
                epochs=6,
                schedule="step",
                decay_every=decay_every,
                decay_multiplier=multiplier,
            )
            assert factor == pytest.approx(value), (epoch, step_in_epoch)


@pytest.mark.parametrize("step", [0, 1, 17, 49, 50, 1000])
def test_constant_is_one(step: int) -> None:
    assert _lr(step, 10, schedule="constant") == 1.0


@pytest.mark.parametrize("steps", [0, -1])
def test_zero_steps_per_epoch_does_not_divide_by_zero(steps: int) -> None:
    assert math.isfinite(_lr(3, steps, warmup_epochs=1.0))
    assert math.isfinite(_lr(3, steps))


# --------------------------------------------------------------------------------------------------
# build_optimizer


def _groups() -> list[dict]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    return [{"params": [layer.weight], "weight_decay": 0.05}, {"params": [layer.bias], "weight_decay": 0.0}]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adamw", torch.optim.AdamW),
        ("AdamW", torch.optim.AdamW),
        ("adam", torch.optim.Adam),
        ("sgd", torch.optim.SGD),
        ("SGD", torch.optim.SGD),
    ],
)
def test_build_optimizer_types(name: str, cls: type) -> None:
    optimizer = train.build_optimizer(name, _groups(), lr=0.01, momentum=0.9)
    assert type(optimizer) is cls
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.01]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0], "groups keep their own weight decay"


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, True), (0.0, False)])
def test_sgd_momentum(momentum: float, nesterov: bool) -> None:
    optimizer = train.build_optimizer("sgd", _groups(), lr=0.1, momentum=momentum)
    assert optimizer.param_groups[0]["momentum"] == momentum
    assert optimizer.param_groups[0]["nesterov"] is nesterov


def test_optimizer_steps() -> None:
    groups = _groups()
    weight = groups[0]["params"][0]
    before = weight.detach().clone()
    optimizer = train.build_optimizer("adamw", groups, lr=0.1)
    weight.sum().backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), before)


@pytest.mark.parametrize("name", ["lamb", "", "rmsprop", "adam_w"])
def test_build_optimizer_unknown_name(name: str) -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        train.build_optimizer(name, _groups(), lr=0.01)


# --------------------------------------------------------------------------------------------------
# The reference script's flags


def _overrides(*argv: str) -> dict[str, Any]:
    return train.reference_overrides(train.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["--sampler", "Weighted"], {"train.sampler": "weighted"}),
        (["--sampler", "Balanced"], {"train.sampler": "balanced"}),
        (["--sampler", "Simple"], {"train.sampler": "simple"}),
        (["--loss_function", "BCELoss"], {"train.loss": "bce"}),
        (["--loss_function", "BCELogitsLoss"], {"train.loss": "bce"}),
        (["--loss_function", "FocalLoss"], {"train.loss": "focal"}),
        (["--learned_loss_attenuation"], {"model.attenuation": True}),
        (["--learned_loss_attnuation"], {"model.attenuation": True}),
        (["--t_number", "30"], {"train.t_samples": 30}),
        (["--fine_tuning", "partial", "--upto_freeze", "30"], {"model.freeze_units": 30}),
        (["--fine_tuning", "full"], {"model.freeze_units": 0}),
        (["--fine_tuning", "full", "--upto_freeze", "30"], {"model.freeze_units": 0}),
        (["--upto_freeze", "12"], {"model.freeze_units": 12}),
        (["--dropout_rate", "0.3"], {"model.dropout": 0.3}),
        (["--optimizer", "adamW"], {"train.optimizer": "adamw"}),
        (["--optimizer", "Adam"], {"train.optimizer": "adam"}),
        (["--optimizer", "sgd"], {"train.optimizer": "sgd"}),
        (["--decay_every_N_epoch", "5"], {"train.schedule": "step", "train.decay_every": 5}),
        (["--decay_multiplier", "0.1"], {"train.decay_multiplier": 0.1}),
        (["--start_learning_rate", "0.0001"], {"train.lr": 0.0001}),
        (["--start_learning_rate", "1e-4"], {"train.lr": 0.0001}),
        (["--weight_decay", "0.01"], {"train.weight_decay": 0.01}),
        (["--batch_size", "16"], {"train.batch_size": 16}),
        (["--num_epochs", "12"], {"train.epochs": 12}),
        (["--random_state", "42"], {"train.seed": 42}),
        (["--exp_name", "run1"], {"name": "run1"}),
        (["--training_augment"], {"train.augment": True}),
        (["--training_augment", "False"], {"train.augment": False}),
        (["--training_augment", "yes"], {"train.augment": True}),
    ],
)
def test_reference_flags_map_to_config_keys(argv: list[str], expected: dict[str, Any]) -> None:
    assert _overrides(*argv) == expected


def test_reference_flags_together_load_into_a_valid_config() -> None:
    overrides = _overrides(
        "--exp_name", "ref", "--sampler", "Balanced", "--loss_function", "BCELoss", "--learned_loss_attnuation",
        "--fine_tuning", "partial", "--upto_freeze", "2", "--optimizer", "adamW", "--start_learning_rate", "0.0001",
        "--num_epochs", "3", "--random_state", "7", "--decay_every_N_epoch", "5", "--decay_multiplier", "0.5",
        "--dropout_rate", "0.2", "--batch_size", "8", "--t_number", "10",
    )  # fmt: skip
    cfg = config.load("demo", overrides)
    assert cfg.name == "ref"
    assert (cfg.train.sampler, cfg.train.loss, cfg.train.optimizer) == ("balanced", "bce", "adamw")
    assert cfg.model.attenuation is True and cfg.model.freeze_units == 2
    assert (cfg.train.schedule, cfg.train.decay_every, cfg.train.decay_multiplier) == ("step", 5, 0.5)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.seed) == (0.0001, 3, 7)
    assert (cfg.model.dropout, cfg.train.batch_size, cfg.train.t_samples) == (0.2, 8, 10)


def test_mapped_keys_are_config_keys() -> None:
    everything = _overrides(
        "--exp_name", "x", "--sampler", "Simple", "--loss_function", "FocalLoss", "--learned_loss_attenuation",
        "--t_number", "5", "--fine_tuning", "partial", "--upto_freeze", "1", "--dropout_rate", "0.1",
        "--optimizer", "sgd", "--start_learning_rate", "0.1", "--weight_decay", "0.0", "--batch_size", "4",
        "--num_epochs", "1", "--training_augment", "true", "--decay_every_N_epoch", "2", "--decay_multiplier", "0.5",
        "--random_state", "0",
    )  # fmt: skip
    keys = set(config.config_keys())
    assert set(everything) <= keys, set(everything) - keys


@pytest.mark.parametrize(
    "argv",
    [
        ["--sampler", "Random"],
        ["--loss_function", "MSELoss"],
        ["--optimizer", "lamb"],
        ["--fine_tuning", "some"],
        ["--training_augment", "maybe"],
        ["--num_epochs", "two"],
    ],
)
def test_reference_flags_refuse_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_partial_fine_tuning_without_a_depth_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """It froze nothing, as --fine_tuning full does, without a word."""
    args = train.build_parser().parse_args(["--fine_tuning", "partial"])
    with pytest.raises(ValueError, match="--fine_tuning partial needs --upto_freeze K"):
        train.reference_overrides(args)
    assert train.main(["--fine_tuning", "partial", "--smoke-test"]) == 2
    assert "error: --fine_tuning partial needs --upto_freeze K" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# resources_plan, backend_for, steps_per_epoch


def _cfg(**overrides: Any) -> config.Config:
    return config.from_dict({}, overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "backend"),
    [
        ({}, "gloo"),
        ({"resources.gpus_per_worker": 1.0}, "nccl"),
        ({"resources.gpus_per_worker": 0.25}, "nccl"),
        ({"resources.gpus_per_worker": 1.0, "resources.backend": "gloo"}, "gloo"),
        ({"resources.backend": "nccl"}, "nccl"),
    ],
)
def test_backend_for(overrides: dict[str, Any], backend: str) -> None:
    cfg = _cfg(**overrides)
    assert train.backend_for(cfg) == backend
    assert train.resources_plan(cfg)["backend"] == backend


def test_cpu_workers_get_the_malloc_settings_and_a_shell_variable_wins(monkeypatch) -> None:
    for name in train.CPU_WORKER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert train.worker_env(_cfg()) == {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_TRIM_THRESHOLD_": "1073741824",
        "MALLOC_MMAP_THRESHOLD_": "33554432",
    }
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert train.worker_env(_cfg())["MALLOC_ARENA_MAX"] == "4"
    # Measured on CPU only: GPU workers keep glibc's defaults.
    assert train.worker_env(_cfg(**{"resources.gpus_per_worker": 1.0})) == {}
    assert train.resources_plan(_cfg(**{"resources.gpus_per_worker": 1.0}))["worker_env"] == {}


def test_resources_plan_cpu() -> None:
    cfg = _cfg(**{"resources.num_workers": 2, "resources.cpus_per_worker": 0.5, "resources.trial_cpus": 0.1})
    assert train.resources_plan(cfg) == {
        "trial_actor": {"CPU": 0.1},
        "workers": 2,
        "per_worker": {"CPU": 0.5},
        "torch_threads_per_worker": "Ray's default (the whole CPUs held, at least 1)",
        "backend": "gloo",
        "trial_total": {"CPU": 1.1, "GPU": 0.0},
        "max_concurrent_trials": 1,
        "worker_env": train.worker_env(cfg),
    }


def test_resources_plan_gpu() -> None:
    cfg = _cfg(
        **{
            "resources.num_workers": 4,
            "resources.cpus_per_worker": 4,
            "resources.gpus_per_worker": 1,
            "resources.max_concurrent_trials": 2,
        }
    )
    plan = train.resources_plan(cfg)
    assert plan["per_worker"] == {"CPU": 4.0, "GPU": 1.0}
    assert plan["trial_total"] == {"CPU": 16.1, "GPU": 4.0}
    assert plan["backend"] == "nccl"
    assert plan["max_concurrent_trials"] == 2


@pytest.mark.parametrize("name", ["demo", "adamw"])
def test_resources_plan_of_shipped_spaces(name: str) -> None:
    cfg = config.load(name)
    plan = train.resources_plan(cfg)
    assert plan["workers"] == cfg.resources.num_workers
    assert plan["backend"] == ("nccl" if cfg.resources.gpus_per_worker > 0 else "gloo")
    if name == "demo":  # two cores for the 0.5-CPU worker's torch (README, "The space file")
        assert plan["torch_threads_per_worker"] == 2


@pytest.mark.parametrize(
    ("n_train", "batch_size", "workers", "epoch_length", "expected"),
    [
        (100, 10, 1, None, 10),
        (101, 10, 1, None, 11),
        (100, 10, 2, None, 5),
        (100, 32, 4, None, 1),
        (1, 32, 1, None, 1),
        (0, 32, 1, None, 1),  # an empty manifest still takes one step rather than none
        (100, 10, 1, 40, 4),  # epoch_length replaces the manifest size
        (100, 10, 2, 1000, 50),
    ],
)
def test_steps_per_epoch(n_train: int, batch_size: int, workers: int, epoch_length: int | None, expected: int) -> None:
    cfg = _cfg(**{"train.batch_size": batch_size, "resources.num_workers": workers, "train.epoch_length": epoch_length})
    assert train.steps_per_epoch(cfg, n_train) == expected


# --------------------------------------------------------------------------------------------------
# channels_last on the CPU


def test_channels_last_on_cpu_computes_what_nchw_does(tmp_path) -> None:
    """The worker lays out batches and model channels_last on the CPU too (train.channels_last); the outputs
    and the saved weights must not change with the layout."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from mammo_ray import data
    from mammo_ray import model as model_mod

    rng = np.random.default_rng(0)
    batch = {
        "image": data.quantise(rng.random((3, 64, 48), dtype=np.float32)),
        "label": np.array([0, 1, 0]),
    }
    cpu = torch.device("cpu")
    images, labels = train._to_tensor(batch, cpu, channels_last=False)
    images_cl, labels_cl = train._to_tensor(batch, cpu, channels_last=True)
    assert images_cl.is_contiguous(memory_format=torch.channels_last)  # with one channel, so is NCHW
    assert torch.equal(images, images_cl) and torch.equal(labels, labels_cl)

    torch.manual_seed(0)
    net = model_mod.create_model("convnext_atto", stem="deep", norm="batch", pool="max").eval()
    with torch.no_grad():
        expected = net(images)
        net_cl = net.to(memory_format=torch.channels_last)
        second = net_cl.stem[3].weight  # 24 -> 40 channels: the layouts differ (the 1-channel first conv's do not)
        assert second.is_contiguous(memory_format=torch.channels_last) and not second.is_contiguous()
        got = net_cl(images_cl)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # The checkpoint writer saves .contiguous() tensors: safetensors refuses strided ones.
    state = {k: v.detach().cpu().contiguous() for k, v in net_cl.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    fresh = model_mod.create_model("convnext_atto", stem="deep", norm="batch", pool="max").eval()
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), expected, rtol=1e-4, atol=1e-5)


def test_default_out_dir_is_not_the_sweep_folder_of_the_same_config(tmp_path, monkeypatch) -> None:
    # `train` with its defaults after `make demo` was refused: its default --out_dir was results/demo, the sweep.
    from pathlib import Path

    from mammo_ray import cli

    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "results" / "demo"
    sweep.mkdir(parents=True)
    (sweep / "config.yaml").write_text("name: demo\n")
    (sweep / "leaderboard.csv").write_text("trial_id\n")
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "resolve_data", lambda cfg, args, reference_csvs=None: {})
    monkeypatch.setattr(cli, "subset_frames", lambda frames, args, seed, metric: frames)
    monkeypatch.setattr(
        train, "run_single", lambda cfg, frames, out_dir, address: seen.setdefault("out", out_dir) and 0
    )
    assert train.main(["--config", "demo"]) == 0
    assert seen["out"] == Path("results") / "demo-train"
    assert sorted(p.name for p in sweep.iterdir()) == ["config.yaml", "leaderboard.csv"]


def test_a_restarted_run_keeps_its_ema_and_its_raw_weights(tmp_path) -> None:
    """On a restart the EMA was set to the raw weights, so the model validated and exported after a worker failure
    or --resume was an average begun afresh."""
    import pandas as pd
    from timm.utils import ModelEmaV3

    cfg = config.load("demo", {"data.image_size": [64, 48]})
    torch.manual_seed(0)
    net = train.model_from_config(cfg)
    ema = ModelEmaV3(net, decay=0.9, use_warmup=True)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # an average that differs from the raw weights
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    train._write_checkpoint(
        folder, model=net, optimizer=optimizer, epoch=3, history=[{"epoch": e} for e in (1, 2, 3)],
        config_yaml=config.dump(cfg), predictions=pd.DataFrame(), metrics={}, report={"epoch": 3}, ema=ema,
    )  # fmt: skip

    torch.manual_seed(1)
    fresh = train.model_from_config(cfg)
    fresh_ema = ModelEmaV3(fresh, decay=0.9, use_warmup=True)
    epoch, history = train.restore_state(
        folder, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3), fresh_ema, "cpu"
    )
    assert epoch == 3 and [row["epoch"] for row in history] == [1, 2, 3]
    for name, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    for name, value in ema.module.state_dict().items():
        assert torch.equal(fresh_ema.module.state_dict()[name], value), name


def test_a_checkpoints_report_records_its_other_files_last(tmp_path) -> None:
    """report.json, written last, lists every other file with its size (and the SHA-256 of those export reads), so
    that export tells a checkpoint whose upload was cut short from a complete one."""
    import hashlib

    import pandas as pd

    cfg = config.load("demo", {"data.image_size": [64, 48]})
    net = train.model_from_config(cfg)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    train._write_checkpoint(
        folder, model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), epoch=1, history=[{"epoch": 1}],
        config_yaml=config.dump(cfg), predictions=pd.DataFrame(), metrics={}, report={"epoch": 1},
    )  # fmt: skip
    files = json.loads((folder / "report.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in folder.iterdir() if p.name != "report.json")
    for name, record in files.items():
        assert record["size"] == (folder / name).stat().st_size
        if name == train.CHECKPOINT_STATE:  # the optimiser state, which export never reads: its size only
            assert "sha256" not in record
        else:
            assert record["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_the_stop_flag_actor_imports_nothing_heavy() -> None:
    # Ray's actor process imports the module that defines the class: from train.py, each trial's flag actor
    # imported torch and albumentations (about 2.4 s of CPU on 2 cores) to hold one asyncio.Event.
    import subprocess
    import sys

    code = "import sys, mammo_ray.stop_flag; print(sorted(m for m in ('torch', 'albumentations', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
