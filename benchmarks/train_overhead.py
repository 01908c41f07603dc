"""Train overhead: samples/s of one Ray Train worker against a plain single-process PyTorch loop.

Ours: ``train.make_trainer`` with ``resources.num_workers=1`` on the prepared synthetic set, fitted as
``python -m mammo_ray.train`` fits it (Ray Data streaming from the cache, ``CyclingStream``, per-epoch
validation, report and checkpoint). The figure is the loop's own ``images_per_s`` report, which times the
training part of each epoch (data waits included, validation and checkpointing excluded), summed over the
steady-state epochs: the first epoch (worker start-up, first pipeline execution) is not counted.

Baseline: the same model (``model.create_model``, same freeze, parameter groups, optimiser, loss, grad
clipping, batch size, image size) trained by a plain loop in this process on the same cached images, which
are decoded and normalised into memory before timing: the compute ceiling that Ray's overhead is measured
against. Its first epoch is not counted either.

Threads: the Train worker gets ``resources.cpus_per_worker`` CPUs and Ray sets its torch threads from that;
a probe TorchTrainer with the same scaling config reads ``torch.get_num_threads()`` inside a Train worker and
the baseline calls ``torch.set_num_threads`` with that number. ``--torch-threads N`` sets ours'
``resources.torch_threads`` (as the demo does, with 2) and gives the baseline the same N. Ray Data gets the
remaining CPUs, as in a real run; with more threads it shares them with the worker's torch. Both sides lay
out the model and batches channels_last, as the worker does on CPU and GPU; on a GPU machine both sides also run
with bf16 AMP.

    python benchmarks/train_overhead.py --quick --out train_overhead.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def probe_threads(cfg) -> dict:
    """torch threads and OMP_NUM_THREADS inside a Train worker with the trial's scaling config."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config):
        import os

        import torch

        # Train V2 keeps no metrics of a report without a checkpoint, so the answer goes through a file.
        facts = {"torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS", "")}
        Path(config["answer"]).write_text(json.dumps(facts))

    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}
    with tempfile.TemporaryDirectory(prefix="mammo-bench-probe-") as tmp:
        answer = Path(tmp) / "threads.json"
        TorchTrainer(
            loop,
            train_loop_config={"answer": str(answer)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=1, use_gpu=res.gpus_per_worker > 0, resources_per_worker=per_worker
            ),
            run_config=ray.train.RunConfig(name="threads-probe", storage_path=tmp),
        ).fit()
        facts = json.loads(answer.read_text())
    return {"torch_threads": int(facts["torch_threads"]), "omp_num_threads": facts["omp"]}


def make_config(args, image_size, batch_size, steps, epochs, cpus_per_worker, use_gpu):
    from mammo_ray import config as config_mod

    cfg = config_mod.load("demo")
    cfg.name = "bench-train-overhead"
    cfg.space = {}
    cfg.data.image_size = list(image_size)
    cfg.model.backbone = args.backbone
    cfg.model.dropout = 0.0
    cfg.model.freeze_units = 0
    cfg.train.epochs = epochs
    cfg.train.batch_size = batch_size
    cfg.train.epoch_length = steps * batch_size
    # The baseline loop reads the same cached pixels in its own order; which images make a batch costs it nothing,
    # so with a class-aware sampler the figure shows what ours pays for planning and streaming its batches.
    cfg.train.sampler = args.sampler
    cfg.train.augment = False  # the baseline would have to augment too; overhead is what is measured
    cfg.train.warmup_epochs = 0.0
    cfg.train.ema = False
    cfg.train.amp = use_gpu
    cfg.train.channels_last = True  # as the worker runs it, on CPU and GPU alike (both sides)
    cfg.resources.num_workers = 1
    cfg.resources.cpus_per_worker = float(cpus_per_worker)
    cfg.resources.gpus_per_worker = 1.0 if use_gpu else 0.0
    cfg.resources.max_failures = 0
    cfg.resources.torch_threads = args.torch_threads
    cfg.search.checkpoints_to_keep = epochs  # the figure comes from the per-epoch history of the last one
    config_mod.validate(cfg, "train_overhead benchmark")
    return cfg


def run_ours(cfg, frames) -> dict:
    import pandas as pd

    from mammo_ray import train

    with tempfile.TemporaryDirectory(prefix="mammo-bench-train-") as tmp:
        trainer = train.make_trainer(cfg, frames, run_name="overhead", storage_path=tmp)
        start = time.perf_counter()
        result = trainer.fit()
        fit_wall = time.perf_counter() - start
        if result.error is not None:
            raise RuntimeError(f"the Train run failed: {result.error}")
        # Every checkpoint holds the whole per-epoch history (train.py writes history.csv with each report).
        history = pd.read_csv(Path(result.checkpoint.path) / "history.csv").sort_values("epoch")
    if len(history) != cfg.train.epochs:
        raise RuntimeError(f"expected {cfg.train.epochs} epoch reports, found {len(history)}")
    images = history["train_images"].to_numpy(dtype=float)
    seconds = images / history["images_per_s"].to_numpy(dtype=float)
    steady = history["epoch"].to_numpy() >= 2
    return {
        "images_per_s": images[steady].sum() / seconds[steady].sum(),
        "first_epoch_images_per_s": float(history["images_per_s"].iloc[0]),
        "per_epoch_images_per_s": [round(v, 2) for v in history["images_per_s"]],
        "per_epoch_time_s": [round(v, 2) for v in history["epoch_time_s"]],
        "fit_wall_s": fit_wall,
        "train_seconds_steady": seconds[steady].sum(),
    }


def run_baseline(cfg, frame, steps: int, device_name: str, threads: int) -> dict:
    """The plain loop, step for step what ``train_loop_per_worker`` does in training, on in-memory data."""
    import torch

    from mammo_ray import cache, data, train
    from mammo_ray import model as model_mod

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    channels_last = cfg.train.channels_last
    use_amp = cfg.train.amp and on_gpu
    rows = {
        c: frame[c].to_numpy() for c in ("cache_file", "cache_offset", "cache_nbytes", "cache_height", "cache_width")
    }
    pixels = np.stack([data.resize_uint16(img, tuple(cfg.data.image_size)) for img in cache.read_images(rows)])
    images_all = torch.from_numpy(data.normalise(pixels.astype(np.float32) / data.PIXEL_SCALE))
    labels_all = torch.from_numpy(frame["label"].to_numpy().astype(np.float32))

    train.seed_everything(cfg.train.seed)
    net = train.model_from_config(cfg)
    groups = model_mod.param_groups(net, cfg.train.weight_decay)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = train.build_optimizer(cfg.train.optimizer, groups, cfg.train.lr, cfg.train.momentum)
    params = [p for group in groups for p in group["params"]]
    loss_fn = train.loss_from_config(cfg).to(device)
    batch = cfg.train.batch_size
    generator = np.random.default_rng(cfg.train.seed)
    order = generator.permutation(len(labels_all))
    cursor = 0
    per_epoch = []
    for epoch in range(cfg.train.epochs):
        net.train()
        start = time.perf_counter()
        seen = 0
        for step in range(steps):
            if cursor + batch > len(order):
                order, cursor = generator.permutation(len(labels_all)), 0
            index = torch.from_numpy(order[cursor : cursor + batch])
            cursor += batch
            images = images_all[index].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels_all[index].to(device, non_blocking=True)
            factor = train.lr_multiplier(
                epoch * steps + step, steps, epochs=cfg.train.epochs, schedule=cfg.train.schedule, warmup_epochs=0.0
            )
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.lr * factor
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                output = net(images)
            loss = loss_fn(output.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise RuntimeError("non-finite loss in the baseline loop")
            optimizer.step()
            float(loss.detach())
            int(labels.sum().item())
            seen += len(labels)
        if on_gpu:
            torch.cuda.synchronize()
        per_epoch.append((seen, time.perf_counter() - start))
    steady = per_epoch[1:]
    return {
        "images_per_s": sum(n for n, _ in steady) / sum(s for _, s in steady),
        "first_epoch_images_per_s": per_epoch[0][0] / per_epoch[0][1],
        "per_epoch_images_per_s": [round(n / s, 2) for n, s in per_epoch],
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="convnext_atto")
    parser.add_argument(
        "--sampler", choices=["simple", "weighted", "balanced"], default="simple", help="ours' train.sampler"
    )
    positive = common.int_at_least(1)
    parser.add_argument("--image-size", type=positive, nargs=2, metavar=("H", "W"), help="quick 128 96, full 256 192")
    parser.add_argument("--batch-size", type=positive, help="quick 16, full 32")
    parser.add_argument("--steps", type=positive, help="optimiser steps per epoch (quick 8, full 20)")
    parser.add_argument(
        "--epochs",
        type=common.int_at_least(2),
        help="epochs including the uncounted first one, so at least 2 (quick 4, full 6)",
    )
    parser.add_argument("--patients", type=positive, help="synthetic patients (quick 60, full 200)")
    parser.add_argument(
        "--cpus-per-worker",
        type=common.float_at_least(0, strict=True),
        help="default: 1 on <= 4 cores, else half the cores",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--torch-threads",
        type=common.int_at_least(0),
        default=0,
        help="resources.torch_threads of ours, and the baseline's threads (0: Ray's default for the worker)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    image_size = tuple(((128, 96) if args.quick else (256, 192)) if args.image_size is None else args.image_size)
    batch_size = (16 if args.quick else 32) if args.batch_size is None else args.batch_size
    steps = (8 if args.quick else 20) if args.steps is None else args.steps
    epochs = (4 if args.quick else 6) if args.epochs is None else args.epochs
    patients = (60 if args.quick else 200) if args.patients is None else args.patients
    n_cores = common.cores()
    default_cpus = 1.0 if n_cores <= 4 else float(n_cores // 2)
    cpus_per_worker = default_cpus if args.cpus_per_worker is None else args.cpus_per_worker
    if cpus_per_worker > n_cores - 1:
        parser.error(f"--cpus-per-worker {cpus_per_worker} leaves Ray Data no CPU on {n_cores} cores")

    import torch

    use_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    num_cpus = common.start_ray(n_cores)
    paths = common.prepared_synthetic(patients, (512, 416), image_size)
    frames = common.load_frames({"train": paths["train"], "valid": paths["valid"]})
    # Validation runs every epoch in ours but is not part of the figure: a small stratified subset keeps it short.
    frames["valid"] = frames["valid"].groupby("label", group_keys=False).head(batch_size).reset_index(drop=True)
    cfg = make_config(args, image_size, batch_size, steps, epochs, cpus_per_worker, use_gpu)

    probe = probe_threads(cfg)
    print(
        f"Train worker: torch threads {probe['torch_threads']}, OMP_NUM_THREADS {probe['omp_num_threads']}",
        file=sys.stderr,
    )
    threads = args.torch_threads or probe["torch_threads"]
    baseline = run_baseline(cfg, frames["train"], steps, "cuda" if use_gpu else "cpu", threads)
    print(f"baseline: {baseline['images_per_s']:.2f} images/s", file=sys.stderr)
    ours = run_ours(cfg, frames)
    print(f"ours: {ours['images_per_s']:.2f} images/s", file=sys.stderr)
    params = {
        "mode": "quick" if args.quick else "full",
        "backbone": args.backbone,
        "image_size": list(image_size),
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "steady_state": "epochs 2..N; the first epoch (start-up, first pipeline execution) is excluded on both sides",
        "ours_figure": "sum of train_images / sum of (train_images / images_per_s) from the per-epoch reports",
        "device": "cuda" if use_gpu else "cpu",
        "amp_bf16": cfg.train.amp,
        "channels_last": cfg.train.channels_last,
        "ray_num_cpus": num_cpus,
        "cpus_per_worker": cpus_per_worker,
        "train_worker_torch_threads": threads,
        "train_worker_omp_num_threads": probe["omp_num_threads"],
        "baseline_torch_threads": threads,
        "ray_data_cpus": num_cpus - cpus_per_worker,
        "sampler": args.sampler,
        "augment": False,
        "train_images_available": len(frames["train"]),
        "valid_images": len(frames["valid"]),
        "baseline_data": "same cache, decoded and normalised into memory before timing (compute ceiling)",
        "synth_patients": patients,
    }
    extra = {
        "ours_detail": ours,
        "baseline_detail": baseline,
        "overhead_fraction": 1.0 - ours["images_per_s"] / baseline["images_per_s"]
        if baseline["images_per_s"]
        else None,
    }
    common.finish(
        "train_overhead",
        ours=ours["images_per_s"],
        baseline=baseline["images_per_s"],
        unit="samples/s",
        params=params,
        out=args.out,
        target_ratio=0.95,
        extra=extra,
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
