"""Training: the Ray Train worker loop, the TorchTrainer that runs it, and the ``train`` command.

A sweep trial and ``python -m mammo_ray.train`` run the same code: :func:`fit` builds a
``TorchTrainer`` (N DDP workers, gloo on CPU and nccl on GPU) over the per-rank datasets from
``data.training_datasets`` and :func:`train_loop_per_worker` runs on every worker. The loop reports
once per epoch (DESIGN.md names: ``epoch, train_loss, val_loss, val_auc, train_positive_fraction,
images_per_s, epoch_time_s``) with a checkpoint that holds the weights (safetensors), the optimiser
state, the resolved config, the epoch's validation predictions and the history so far, so export
needs no second pass over the validation set. Validation metrics are computed on the predictions of
all ranks, gathered.

This is the only module that calls ``ray.train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_ray import config as config_mod
from mammo_ray import data, environment, io, manifest

log = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_STATE = "training_state.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial stops as failed with this reason."""


# --------------------------------------------------------------------------------------------------
# Stopping a run cooperatively.
#
# When Tune stops a trial (ASHA, max_t, Ctrl-C) it ends the trial's actor, and with it the Train controller and
# workers. A killed worker leaves its Ray Data streams' resource requests, and its run's, registered with Ray's
# cluster-wide AutoscalingCoordinator until they expire (180 s in Ray 2.60); meanwhile the next trial's data
# pipeline gets no CPU budget and waits "backpressured" (the hang that stopped trials caused on 2 cores). So the
# trial asks its run to stop instead: the workers finish the current step, close their streams and return, and
# the controller shuts down normally, which cancels every request.


class RunStopper:
    """Held by the process that fits a TorchTrainer: asks the run's workers to stop at their next step."""

    def __init__(self) -> None:
        import ray

        from mammo_ray.stop_flag import StopFlag

        self.flag = ray.remote(num_cpus=0)(StopFlag).remote()
        self.finished = threading.Event()

    def fit(self, trainer):
        """``trainer.fit()``, marking the run finished however it ends, so that :meth:`stop` stops waiting."""
        try:
            return trainer.fit()
        finally:
            self.finished.set()

    def stop(self, timeout: float) -> bool:
        """Ask the workers to stop, then wait up to ``timeout`` s for :meth:`fit` to return."""
        self.flag.set.remote()
        return self.finished.wait(timeout)


class _StopWatch:
    """The workers' side of :class:`RunStopper`: rank 0 watches the flag, and every rank learns of it together."""

    def __init__(self, flag, rank: int, device) -> None:
        import ray

        self._ray = ray
        self._active = flag is not None  # the same on every rank: the loop config is
        self._ref = flag.wait.remote() if self._active and rank == 0 else None
        self._device = device

    def requested(self) -> bool:
        if not self._active:
            return False
        # A local, non-blocking look at one object ref; the all-reduce makes every rank stop at the same step
        # (DDP would otherwise leave the others waiting in a gradient all-reduce).
        seen = 1.0 if self._ref is not None and self._ray.wait([self._ref], timeout=0)[0] else 0.0
        return _all_reduce([seen], self._device, "max")[0] > 0


# --------------------------------------------------------------------------------------------------
# Plain helpers (no Ray): optimiser, schedule, seeding.


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9):
    """AdamW, Adam or SGD over parameter groups that already carry their weight decay."""
    import torch

    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        # torch's Adam adds weight decay to the gradient (L2), not decoupled; that is what "adam" means here.
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; use adamw, adam or sgd")


def lr_multiplier(
    step: int,
    steps_per_epoch: int,
    *,
    epochs: int,
    schedule: str,
    warmup_epochs: float = 0.0,
    decay_every: int = 0,
    decay_multiplier: float = 0.5,
) -> float:
    """Learning-rate factor at a step: linear warm-up, then cosine to 0, step decay or constant."""
    progress = step / max(1, steps_per_epoch)  # in epochs
    warmup_steps = math.ceil(warmup_epochs * steps_per_epoch) if warmup_epochs > 0 else 0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1e-9, epochs - warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup_epochs) / span)))
    if schedule == "step":
        return decay_multiplier ** int(progress // decay_every) if decay_every > 0 else 1.0
    return 1.0


# glibc malloc settings for the Train workers of a CPU run. Ray Train V2 runs the training loop in a thread of
# the worker process, and glibc gives that thread an arena of its own whose heaps it hands back to the kernel as
# each step frees its activations, so the next step faults them in again. With ConvNeXt at 256x208, batch 32,
# 2 threads, a loop in a thread took 1.7-3.3M page faults per 12-24 steps and 13-15% of its CPU time in the
# kernel; one arena that keeps up to 1 GiB of freed memory cut the faults to 0.03-0.2M and the kernel share
# under 2%, 26-29 -> 31-32 images/s (a loop on the main thread, as a plain script runs: 33-34). In the Train
# worker (benchmarks/train_overhead.py at 256x208, three runs each): 25.7-26.3 -> 27.5-31.7 images/s.
# Ray reads them when it starts a worker; a variable set in the launching shell wins.
CPU_WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's largest: blocks above 32 MiB still come from mmap
}


def worker_env(cfg: config_mod.Config) -> dict[str, str]:
    """Environment variables for the run's Train workers: :data:`CPU_WORKER_ENV` on CPU, none on GPU."""
    if cfg.resources.gpus_per_worker > 0:
        return {}
    return {name: os.environ.get(name, value) for name, value in CPU_WORKER_ENV.items()}


def resources_plan(cfg: config_mod.Config) -> dict[str, Any]:
    """Per-trial resources as Ray will reserve them (printed by ``--dry-run``)."""
    res = cfg.resources
    return {
        "trial_actor": {"CPU": res.trial_cpus},
        "workers": res.num_workers,
        "per_worker": worker_resources(cfg),
        # Threads are not reserved: they say how many cores each worker's torch computes on.
        "torch_threads_per_worker": res.torch_threads or "Ray's default (the whole CPUs held, at least 1)",
        "backend": backend_for(cfg),
        "trial_total": {
            "CPU": round(res.trial_cpus + res.num_workers * res.cpus_per_worker, 3),
            "GPU": res.num_workers * res.gpus_per_worker,
        },
        "max_concurrent_trials": res.max_concurrent_trials,
        "worker_env": worker_env(cfg),
    }


def worker_resources(cfg: config_mod.Config) -> dict[str, float]:
    """Ray resources of one Train worker."""
    per_worker = {"CPU": cfg.resources.cpus_per_worker}
    if cfg.resources.gpus_per_worker > 0:
        per_worker["GPU"] = cfg.resources.gpus_per_worker
    return per_worker


def model_from_config(cfg: config_mod.Config, *, for_inference: bool = False):
    """The model of a config, with its freeze units applied (the adapter between config and ``model``).

    Args:
        for_inference: skip the pretrained file (the caller loads trained weights) and stochastic depth.
    """
    from mammo_ray import model as model_mod

    net = model_mod.create_model(
        cfg.model.backbone,
        in_chans=cfg.model.in_chans,
        pretrained=None if for_inference else cfg.model.pretrained,
        drop_path_rate=0.0 if for_inference else cfg.model.drop_path_rate,
        dropout=cfg.model.dropout,
        pool=cfg.model.pool,
        attenuation=cfg.model.attenuation,
        stem=cfg.model.stem,
        norm=cfg.model.norm,
    )
    if not for_inference:
        model_mod.apply_freeze(net, cfg.model.freeze_units)
    return net


def loss_from_config(cfg: config_mod.Config):
    """The training loss of a config (the adapter between config and ``losses``)."""
    from mammo_ray import losses

    return losses.build_loss(
        cfg.train.loss,
        attenuation=cfg.model.attenuation,
        t_samples=cfg.train.t_samples,
        pos_weight=cfg.train.pos_weight,
        focal_alpha=cfg.train.focal_alpha,
        focal_gamma=cfg.train.focal_gamma,
    )


def backend_for(cfg: config_mod.Config) -> str:
    if cfg.resources.backend != "auto":
        return cfg.resources.backend
    return "nccl" if cfg.resources.gpus_per_worker > 0 else "gloo"


def steps_per_epoch(cfg: config_mod.Config, n_train: int) -> int:
    """Optimiser steps per epoch on each worker (all workers take the same number)."""
    epoch_length = cfg.train.epoch_length or n_train
    return max(1, math.ceil(epoch_length / (cfg.train.batch_size * cfg.resources.num_workers)))


# --------------------------------------------------------------------------------------------------
# The worker loop.


def _write_checkpoint(
    directory: Path,
    *,
    model,
    optimizer,
    epoch: int,
    history: list[dict],
    config_yaml: str,
    predictions: pd.DataFrame,
    metrics: dict,
    report: dict,
    run_environment: dict | None = None,
    ema=None,
) -> None:
    import torch
    from safetensors.torch import save_file

    weights_source = ema.module if ema is not None else model
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(weights_source).state_dict().items()}
    save_file(state, str(directory / CHECKPOINT_WEIGHTS))
    torch.save(
        {
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        },
        directory / CHECKPOINT_STATE,
    )
    (directory / "config.yaml").write_text(config_yaml)
    predictions.to_csv(directory / "val_predictions.csv", index=False)
    pd.DataFrame(history).to_csv(directory / "history.csv", index=False)
    (directory / "metrics.json").write_text(json.dumps({"val": metrics, "epoch": epoch}, indent=2, default=_jsonable))
    # The environment goes to report.json only: the epoch report itself (Tune's metrics, history.csv) stays numeric.
    full_report = {**report, "environment": run_environment} if run_environment else dict(report)
    # Last: the size of every other file, and the SHA-256 of those export reads. Ray uploads the folder file by file
    # and in no set order, so a worker or node that stops mid-upload leaves some files missing or short; export
    # skips such a checkpoint (and refuses one whose content differs) instead of loading it.
    full_report["files"] = {
        path.name: io.file_record(path, digest=path.name != CHECKPOINT_STATE)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != "report.json"
    }
    (directory / "report.json").write_text(json.dumps(full_report, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not np.isfinite(value) else float(value)
    return str(value)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _to_tensor(batch: dict[str, np.ndarray], device, channels_last: bool):
    import torch

    images = data.to_model_input(torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(np.ascontiguousarray(batch["label"], dtype=np.float32)).to(device, non_blocking=True)
    return images, labels


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def _epoch_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The validation metrics that go into the per-epoch report (numbers only; None → NaN)."""
    out = {}
    for name in config_mod.SELECTION_METRICS:
        if name != "val_loss":  # the loop's own mean loss, reported beside these
            value = metrics.get(name.removeprefix("val_"))
            out[name] = float("nan") if value is None else float(value)
    return out


def restore_state(directory: Path, net, optimizer, ema, device) -> tuple[int, list[dict]]:
    """Load a checkpoint into a run that restarts: the raw weights and the optimiser carry on training, and the EMA
    carries on from the averaged weights the checkpoint holds (``model.safetensors``; it was reset to the raw
    weights before, so a restarted run validated and exported an average begun afresh).

    Returns:
        The epochs already done and the history up to them.
    """
    import torch
    from safetensors.torch import load_file

    state = torch.load(directory / CHECKPOINT_STATE, map_location=device, weights_only=True)
    _unwrap(net).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.module.load_state_dict(load_file(str(directory / CHECKPOINT_WEIGHTS), device=str(device)))
    return int(state["epoch"]), pd.read_csv(directory / "history.csv").to_dict("records")


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function: train, validate, report and checkpoint once per epoch."""
    import ray.train
    import ray.train.torch
    import torch

    from mammo_ray import metrics, predict
    from mammo_ray import model as model_mod

    cfg = config_mod.from_dict(loop_config["config"], source="trial config")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    seed_everything(cfg.train.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    if cfg.resources.torch_threads:
        torch.set_num_threads(cfg.resources.torch_threads)
    on_gpu = device.type == "cuda"
    # channels_last also pays on CPU for the BatchNorm build (1.24-1.37x training images/s on 2 cores at 256x208,
    # benchmarks/cpu_step.py); for timm's LayerNorm build it is neutral (1.02-1.04x).
    channels_last = cfg.train.channels_last
    use_amp = cfg.train.amp and on_gpu

    net = model_from_config(cfg)
    trainable = model_mod.trainable_parameters(net)
    groups = model_mod.param_groups(net, cfg.train.weight_decay)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": False})
    optimizer = build_optimizer(cfg.train.optimizer, groups, cfg.train.lr, cfg.train.momentum)
    trainable_params = [p for group in groups for p in group["params"]]
    loss_fn = loss_from_config(cfg).to(device)
    ema = None
    if cfg.train.ema:
        from timm.utils import ModelEmaV3

        # Warm-up (timm: decay 1 - (1 + step)^(-2/3), capped at ema_decay): without it an EMA of decay 0.999 is
        # still 83% its initial weights after the demo's 192 steps, and validation and ASHA would judge those.
        ema = ModelEmaV3(_unwrap(net), decay=cfg.train.ema_decay, device=device, use_warmup=True)

    run_environment = environment.describe(device, num_workers=context.get_world_size()) if rank == 0 else None
    steps = loop_config["steps_per_epoch"]
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_epoch, history = restore_state(Path(directory), net, optimizer, ema, device)
        log.info("rank %d resumed after epoch %d", rank, start_epoch)

    def set_lr(global_step: int) -> float:
        factor = lr_multiplier(
            global_step,
            steps,
            epochs=cfg.train.epochs,
            schedule=cfg.train.schedule,
            warmup_epochs=cfg.train.warmup_epochs,
            decay_every=cfg.train.decay_every,
            decay_multiplier=cfg.train.decay_multiplier,
        )
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.lr * factor
        return cfg.train.lr * factor

    # Chunks of a whole batch: each take is then a view of one chunk, not a copy.
    chunk = cfg.train.batch_size
    # Every rank takes the same number of steps per epoch (DDP all-reduces each backward pass), so each
    # stream cycles rather than ending with its rank's share.
    # One stream per rank whatever the sampler: the class-aware samplers' batches are planned into its row order
    # (data.class_aware_rows), so taking batch_size rows gives the planned batch.
    stream = data.CyclingStream(ray.train.get_dataset_shard(f"train_{rank}"), chunk_size=chunk)
    valid_iter = ray.train.get_dataset_shard(f"valid_{rank}") if loop_config["valid_ranks"][rank] else None
    config_yaml = config_mod.dump(cfg)
    gauges = _metrics_gauges(loop_config.get("run_name", "run")) if rank == 0 else None

    stop_watch = _StopWatch(loop_config.get("stop_flag"), rank, device)
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            epoch_number = epoch + 1
            started = time.perf_counter()
            net.train()
            batches = (stream.take(cfg.train.batch_size) for _ in range(steps))
            loss_sum, seen, positives, nonfinite = 0.0, 0, 0, 0.0
            batch_share_min, batch_share_max = 1.0, 0.0
            stopped = False
            for step_in_epoch, batch in enumerate(batches):
                if stop_watch.requested():
                    stopped = True
                    break
                images, labels = _to_tensor(batch, device, channels_last)
                set_lr(epoch * steps + step_in_epoch)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    output = net(images)
                loss = loss_fn(output.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # DDP averages gradients, so a NaN on any rank makes this norm NaN on every rank: all ranks
                # stop at the same step instead of one rank leaving the others waiting in an all-reduce.
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params, cfg.train.grad_clip or float("inf"))
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    nonfinite = 1.0
                    break
                optimizer.step()
                if ema is not None:
                    ema.update(_unwrap(net), step=epoch * steps + step_in_epoch + 1)
                loss_sum += float(loss.detach()) * len(labels)
                seen += len(labels)
                positives += int(labels.sum().item())
                share = float(labels.mean())
                batch_share_min, batch_share_max = min(batch_share_min, share), max(batch_share_max, share)
            if stopped:
                # The sweep stopped this trial (ASHA, Ctrl-C): the partial epoch is neither reported nor checkpointed.
                log.info("rank %d stops in epoch %d, as asked", rank, epoch_number)
                return {"epoch": epoch, "stopped": True}
            # A rank that met a non-finite loss stops; all ranks learn of it here and stop together.
            totals = _all_reduce([loss_sum, seen, positives, nonfinite], device)
            share_min = _all_reduce([batch_share_min], device, "min")[0]
            share_max = _all_reduce([batch_share_max], device, "max")[0]
            train_time = time.perf_counter() - started
            if totals[3] > 0:
                report = {
                    "epoch": epoch_number,
                    "nonfinite_loss": 1.0,
                    "train_loss": float("nan"),
                    "val_auc": float("nan"),
                }
                ray.train.report(report)
                # Train V2's Result.metrics holds only reports with a checkpoint; the caller reads this via return_value.
                return report

            eval_model = ema.module if ema is not None else net
            local_predictions, val_loss_sum = pd.DataFrame(), 0.0
            if valid_iter is not None:
                local_predictions, val_loss_sum = predict.predict_iterator(
                    eval_model,
                    valid_iter,
                    device=device,
                    batch_size=cfg.train.batch_size,
                    loss_fn=loss_fn,
                    mc_samples=cfg.train.mc_dropout_samples,
                    tta=cfg.train.tta,
                    channels_last=channels_last,
                    use_amp=use_amp,
                )
            val_totals = _all_reduce([val_loss_sum, len(local_predictions)], device)
            predictions = metrics.gather_predictions(local_predictions)
            # At the reference's 0.3, the names of the history and of config.SELECTION_METRICS (val_sensitivity@0.3);
            # train.threshold is the bundle's decision threshold (thresholds.json, the ROC marker, predict).
            val_metrics = metrics.compute_split_metrics(predictions)
            epoch_time = time.perf_counter() - started
            report = {
                "epoch": epoch_number,
                "train_loss": totals[0] / max(1, totals[1]),
                "val_loss": val_totals[0] / max(1, val_totals[1]),
                **_epoch_scalars(val_metrics),
                "train_positive_fraction": totals[2] / max(1, totals[1]),
                "train_images": int(totals[1]),
                # Extremes of the per-batch positive share on any rank: the balanced sampler gives 0.5 and 0.5.
                "train_batch_positive_min": share_min,
                "train_batch_positive_max": share_max,
                "images_per_s": totals[1] / max(1e-9, train_time),
                "epoch_time_s": epoch_time,
                "lr": optimizer.param_groups[0]["lr"],
                "trainable_params": trainable,
                "torch_threads": torch.get_num_threads(),
                "nonfinite_loss": 0.0,
            }
            if on_gpu:
                report["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            history.append(report)
            if gauges is not None:
                _set_gauges(gauges, report)
            if rank == 0:
                with tempfile.TemporaryDirectory() as directory:
                    _write_checkpoint(
                        Path(directory),
                        model=net,
                        optimizer=optimizer,
                        epoch=epoch_number,
                        history=history,
                        config_yaml=config_yaml,
                        predictions=predictions,
                        metrics=val_metrics,
                        report=report,
                        run_environment=run_environment,
                        ema=ema,
                    )
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(report)

    finally:
        # Drained or not, the stream's pass ends here, so its Ray Data budget is given back at once.
        stream.close()


def _metrics_gauges(run_name: str):
    """Prometheus gauges (``ray.util.metrics``) for the dashboard, tagged by run."""
    try:
        from ray.util.metrics import Gauge
    except ImportError:  # pragma: no cover
        return None
    names = {
        "images_per_s": "Training images per second",
        "train_loss": "Mean training loss of the last epoch",
        "val_auc": "Validation ROC-AUC of the last epoch",
        "epoch_time_s": "Seconds per epoch",
        "gpu_memory_gb": "Peak GPU memory allocated by rank 0 (GB)",
    }
    gauges = {key: Gauge(f"mammo_ray_{key}", description=text, tag_keys=("run",)) for key, text in names.items()}
    for gauge in gauges.values():
        gauge.set_default_tags({"run": run_name})
    return gauges


def _set_gauges(gauges, report: dict) -> None:
    for key, gauge in gauges.items():
        value = report.get(key)
        if value is not None and math.isfinite(value):
            gauge.set(float(value))


# --------------------------------------------------------------------------------------------------
# The trainer.


def make_trainer(
    cfg: config_mod.Config,
    frames: dict[str, pd.DataFrame],
    *,
    run_name: str,
    storage_path: str,
    callbacks: list | None = None,
    stopper: RunStopper | None = None,
):
    """A TorchTrainer for one run over the validated manifests (datasets built here, in this process).

    Args:
        stopper: lets this process stop the run cooperatively (a sweep trial that Tune stops).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources
    steps = steps_per_epoch(cfg, len(frames["train"]))
    datasets = data.training_datasets(
        frames,
        num_workers=res.num_workers,
        sampler=cfg.train.sampler,
        image_size=tuple(cfg.data.image_size),
        use_cache=cfg.data.use_cache,
        seed=cfg.train.seed,
        augment_images=cfg.train.augment,
        positive_strength=cfg.train.augment_positive_strength,
        load_batch_size=cfg.data.load_batch_size,
        rows_per_rank=steps * cfg.train.batch_size * cfg.train.epochs,
        batch_size=cfg.train.batch_size,
        steps_per_epoch=steps,
        positive_fraction=cfg.train.positive_fraction,
    )
    loop_config = {
        "config": cfg.to_dict(),
        "steps_per_epoch": steps,
        "valid_ranks": [f"valid_{rank}" in datasets for rank in range(res.num_workers)],
        "run_name": run_name,
        "stop_flag": stopper.flag if stopper is not None else None,
    }
    env = worker_env(cfg)
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=storage_path,
        callbacks=callbacks or [],
        worker_runtime_env={"env_vars": env} if env else None,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.search.checkpoints_to_keep,
            checkpoint_score_attribute=cfg.search.metric,
            checkpoint_score_order=cfg.search.mode,
        ),
        failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=worker_resources(cfg)
        ),
        torch_config=TorchConfig(backend=backend_for(cfg)),
        # Every dataset is already one rank's share (see data.py), so Train must not split any. Rows keep the
        # seeded shuffle's order through the parallel map_batches tasks, so that identical seeds give identical runs.
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=_ingest_options()),
        datasets=datasets,
        run_config=run_config,
    )


def _ingest_options():
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def best_checkpoint_dir(result, metric: str, mode: str) -> Path | None:
    """The folder of the best-scoring checkpoint of a finished Train run."""
    checkpoint = result.get_best_checkpoint(metric=metric, mode=mode) if result.best_checkpoints else None
    if checkpoint is None:
        checkpoint = result.checkpoint
    return Path(checkpoint.path) if checkpoint is not None else None


# --------------------------------------------------------------------------------------------------
# The ``train`` command: one run with no sweep, with the reference script's flags.

REFERENCE_SAMPLERS = {"weighted": "weighted", "balanced": "balanced", "simple": "simple"}
REFERENCE_LOSSES = {"focalloss": "focal", "bceloss": "bce", "bcelogitsloss": "bce"}
REFERENCE_OPTIMIZERS = {"adam": "adam", "sgd": "sgd", "adamw": "adamw"}


def _truthy(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mammo-ray train",
        description="One training run (no sweep) on the same Ray Train code path as a sweep trial.",
    )
    parser.add_argument(
        "--config", default="demo", help="space file (resolved like tune --space); its space is ignored"
    )
    parser.add_argument("--train", help="training manifest (Parquet or CSV)")
    parser.add_argument("--valid", help="validation manifest")
    parser.add_argument("--test", help="test manifest (scored at export)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--address", help="join an existing Ray cluster")
    parser.add_argument("--smoke-test", action="store_true", help="a handful of images, one epoch, on CPU")
    parser.add_argument("-v", "--verbose", action="store_true")
    ref = parser.add_argument_group("the reference script's flags")
    ref.add_argument("--exp_name", help="experiment name (config key name)")
    ref.add_argument("--train_csv_pth", help="training CSV in the reference layout (path_eq, cancer, datasettype)")
    ref.add_argument("--valid_csv_pth", help="validation CSV in the reference layout")
    ref.add_argument(
        "--out_dir",
        help="folder for the bundle, history.csv and the reference's result files (default: results/<name>-train)",
    )
    ref.add_argument("--data", help="keep only these datasets (comma-separated values of the dataset column)")
    ref.add_argument("--sampler", type=str.lower, choices=sorted(REFERENCE_SAMPLERS))
    ref.add_argument("--loss_function", type=str.lower, choices=sorted(REFERENCE_LOSSES))
    ref.add_argument(
        "--learned_loss_attenuation", "--learned_loss_attnuation", dest="attenuation", action="store_true", default=None
    )
    ref.add_argument("--t_number", type=int, help="samples T of the attenuation loss")
    ref.add_argument("--fine_tuning", choices=["full", "partial"])
    ref.add_argument("--upto_freeze", type=int, help="freeze the first K units (with --fine_tuning partial)")
    ref.add_argument("--dropout_rate", type=float)
    ref.add_argument("--optimizer", type=str.lower, choices=sorted(REFERENCE_OPTIMIZERS))
    ref.add_argument("--start_learning_rate", type=float)
    ref.add_argument("--weight_decay", type=float)
    ref.add_argument("--batch_size", type=int)
    ref.add_argument("--num_epochs", type=int)
    ref.add_argument("--training_augment", type=_truthy, nargs="?", const=True)
    ref.add_argument("--dataset_partition", type=float, help="random patient-level fraction of the training set")
    ref.add_argument("--rows_experiment", type=int, help="random patient-level subset of about this many rows")
    ref.add_argument("--decay_every_N_epoch", type=int)
    ref.add_argument("--decay_multiplier", type=float)
    ref.add_argument("--random_state", type=int)
    return parser


def reference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Map the reference script's flags, once, onto config keys."""
    out: dict[str, Any] = {}
    simple = {
        "exp_name": "name",
        "t_number": "train.t_samples",
        "dropout_rate": "model.dropout",
        "start_learning_rate": "train.lr",
        "weight_decay": "train.weight_decay",
        "batch_size": "train.batch_size",
        "num_epochs": "train.epochs",
        "training_augment": "train.augment",
        "decay_multiplier": "train.decay_multiplier",
        "random_state": "train.seed",
    }
    for flag, key in simple.items():
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    if args.sampler:
        out["train.sampler"] = REFERENCE_SAMPLERS[args.sampler]
    if args.loss_function:
        out["train.loss"] = REFERENCE_LOSSES[args.loss_function]
    if args.attenuation:
        out["model.attenuation"] = True
    if args.optimizer:
        out["train.optimizer"] = REFERENCE_OPTIMIZERS[args.optimizer]
    if args.fine_tuning == "partial" and args.upto_freeze is None:
        # It froze nothing, as full fine-tuning does, without a word.
        raise ValueError("--fine_tuning partial needs --upto_freeze K, the number of leading units to freeze")
    if args.fine_tuning == "full":
        out["model.freeze_units"] = 0
    elif args.fine_tuning == "partial" or args.upto_freeze is not None:
        out["model.freeze_units"] = args.upto_freeze
    if args.decay_every_N_epoch is not None:
        out["train.schedule"] = "step"
        out["train.decay_every"] = args.decay_every_N_epoch
    return out


def main(argv: list[str] | None = None) -> int:
    from mammo_ray import cli, export

    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose)
    try:
        overrides = dict(config_mod.parse_override(item) for item in args.set)
        overrides.update(reference_overrides(args))
        cfg = config_mod.load(args.config, overrides)
        if args.smoke_test:
            cli.apply_smoke_test(cfg)
        cli.resolve_weights(cfg)
        cli.check_model(cfg, searched=False)
        # Not results/<name>: that is the sweep folder of the same config (make demo's results/demo).
        out_dir = Path(args.out_dir or Path("results") / f"{cfg.name}-train")
        export.check_bundle_folder(out_dir)  # a folder of the user's, whose files the bundle would replace
        frames = cli.resolve_data(cfg, args, reference_csvs=(args.train_csv_pth, args.valid_csv_pth))
        frames = cli.subset_frames(frames, args, seed=cfg.train.seed, metric=cfg.search.metric)
    except (config_mod.ConfigError, manifest.ManifestError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_single(cfg, frames, out_dir, address=args.address)


def run_single(cfg: config_mod.Config, frames: dict[str, pd.DataFrame], out_dir: Path, address: str | None) -> int:
    """Fit one TorchTrainer and export its best epoch to ``out_dir``."""
    from mammo_ray import cli, export, tune

    try:
        cli.start_ray(address=address)
        cli.check_shared_storage(
            out_dir / "ray",
            "train keeps its run under --out_dir on this machine; run it on one node, or use tune with --storage "
            "(a bucket or a shared NFS path) for a multi-node cluster",
        )
        cli.check_placement(cfg)
        tune.fit_concurrency(cfg, single_run=True)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    storage = str((out_dir / "ray").resolve())
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = make_trainer(cfg, frames, run_name=run_name, storage_path=storage)
    result = trainer.fit()
    final = result.return_value if isinstance(result.return_value, dict) else (result.metrics or {})
    if final.get("nonfinite_loss"):
        print(f"error: training stopped: non-finite loss in epoch {final.get('epoch')}", file=sys.stderr)
        return 1
    best = best_checkpoint_dir(result, cfg.search.metric, cfg.search.mode)
    if best is None:
        print("error: the run produced no checkpoint", file=sys.stderr)
        return 1
    # The bundle is the best epoch's, but history.csv (and the curves drawn from it) covers every epoch that ran.
    last = Path(result.checkpoint.path) if result.checkpoint is not None else None
    epochs = int(pd.read_csv(Path(last or best) / "history.csv")["epoch"].max())  # the candidates it was chosen from
    try:
        bundle = export.export_bundle(
            best,
            out_dir,
            cfg,
            frames,
            reference_files=True,
            history_from=last,
            sweep_info={"metric": cfg.search.metric, "candidates": epochs},
        )
    except export.CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"best epoch exported to {bundle}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The importable module's main, not this ``__main__`` copy's: Ray pickles ``__main__`` by value (see prepare.py).
    from mammo_ray import train as _module

    raise SystemExit(_module.main())
