"""Ingest: images/s that the data pipeline delivers to a training loop that only consumes batches.

Ours: ``data.make_dataset`` over the prepared cache (one pass of seeded per-epoch permutations of the
metadata, sized like a trial's with ``data.epochs_per_pass``; pixels read by random access inside
``map_batches`` tasks), with the execution options ``train.make_trainer`` gives its datasets, iterated the
way a Train worker iterates it: through ``data.CyclingStream`` (``iter_batches`` with numpy batches,
``prefetch_batches=2``), taking one training batch per step and converting it with ``data.to_model_input``
(uint16 → normalised float32), as the training loop does. Ray runs with
``num_cpus`` = the machine's cores, all of them free for Ray Data.

Baseline: ``torch.utils.data.DataLoader`` with as many worker processes as Ray has CPUs, over a
``Dataset`` whose ``__getitem__`` reads one image with ``cache.read_image`` and applies the same
normalisation (``data.MEAN``/``data.STD``), shuffled, same batch size, persistent workers.

Both read the same cache at the same image size, without augmentation. Whole epochs of each, at least one
and at least ``--warmup-s`` seconds (worker start-up, imports, page cache, the executor's ramp-up), are a
warm-up and are not timed; the figure is images over the next ``--epochs`` epochs divided by their wall
time. With ``--repeats`` > 1 the two alternate and the medians
are reported.

    python benchmarks/ingest.py --quick --out ingest.json
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


class CacheDataset:
    """The baseline's map-style dataset: one cached image per item, normalised like ``data.load_batch``."""

    def __init__(self, frame, image_size: tuple[int, int]):
        self.files = frame["cache_file"].to_numpy()
        self.offsets = frame["cache_offset"].to_numpy()
        self.nbytes = frame["cache_nbytes"].to_numpy()
        self.heights = frame["cache_height"].to_numpy()
        self.widths = frame["cache_width"].to_numpy()
        self.labels = frame["label"].to_numpy().astype(np.float32)
        self.image_size = tuple(image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        import torch

        from mammo_ray import cache, data

        pixels = cache.read_image(
            self.files[index], self.offsets[index], self.nbytes[index], self.heights[index], self.widths[index]
        )
        image = data.resize_uint16(pixels, self.image_size).astype(np.float32) / data.PIXEL_SCALE
        image = ((image - data.MEAN) / data.STD)[None].astype(np.float32, copy=False)
        return torch.from_numpy(image), torch.tensor(self.labels[index])


def train_ingest_options():
    """The Ray Data execution options that ``train.make_trainer`` gives its datasets."""
    from ray.train import DataConfig

    from mammo_ray import train

    make_options = getattr(train, "_ingest_options", None)
    return make_options() if make_options is not None else DataConfig.default_ingest_options()


def run_ours(dataset, n_rows: int, batch_size: int, epochs: int, warmup_s: float) -> dict:
    """Warm-up epochs (at least one, and at least ``warmup_s`` seconds), then ``epochs`` timed epochs of
    ``ceil(n / B)`` batches from a CyclingStream, closed at the end even on an error: a pass left open keeps its
    Ray Data budget until the request expires (``CyclingStream.close``), minutes into the baseline's turn."""
    import torch

    from mammo_ray import data

    stream = data.CyclingStream(dataset, chunk_size=batch_size)  # as train.train_loop_per_worker
    steps = math.ceil(n_rows / batch_size)

    def epoch() -> tuple[int, tuple]:
        images, shape = 0, None
        for _ in range(steps):
            batch = stream.take(batch_size)
            # What the training loop does with it (train._to_tensor on CPU): uint16 -> normalised float32.
            tensor = data.to_model_input(torch.from_numpy(np.ascontiguousarray(batch["image"])))
            shape = tuple(tensor.shape)
            images += shape[0]
        return images, shape

    try:
        return _timed(epoch, epochs, warmup_s) | {"passes": stream.passes}
    finally:
        stream.close()


def run_baseline(loader, epochs: int, warmup_s: float) -> dict:
    def epoch() -> tuple[int, tuple]:
        images, shape = 0, None
        for images_batch, _labels in loader:
            shape = tuple(images_batch.shape)
            images += shape[0]
        return images, shape

    return _timed(epoch, epochs, warmup_s)


def _timed(epoch, epochs: int, warmup_s: float) -> dict:
    warm_start, warm_epochs = time.perf_counter(), 0
    while warm_epochs == 0 or time.perf_counter() - warm_start < warmup_s:
        epoch()
        warm_epochs += 1
    warm_elapsed = time.perf_counter() - warm_start
    images, shape, per_epoch = 0, None, []
    start = time.perf_counter()
    for _ in range(epochs):
        began = time.perf_counter()
        n, shape = epoch()
        images += n
        per_epoch.append(round(n / (time.perf_counter() - began), 1))
    elapsed = time.perf_counter() - start
    return {
        "images": images,
        "seconds": elapsed,
        "images_per_s": images / elapsed,
        "warmup_s": warm_elapsed,
        "warmup_epochs": warm_epochs,
        "epoch_images_per_s": per_epoch,
        "shape": shape,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    positive = common.int_at_least(1)
    parser.add_argument("--patients", type=positive, help="synthetic patients (quick 60, full 400)")
    parser.add_argument("--synth-size", type=positive, nargs=2, metavar=("H", "W"), help="stored DICOM size")
    parser.add_argument("--image-size", type=positive, nargs=2, metavar=("H", "W"), help="training size of the cache")
    parser.add_argument("--batch-size", type=positive, default=32)
    parser.add_argument("--epochs", type=positive, help="timed epochs after the warm-up (quick 20, full 8)")
    parser.add_argument(
        "--warmup-s",
        type=common.float_at_least(0),
        default=3.0,
        help="untimed warm-up per round: whole epochs, at least this long",
    )
    parser.add_argument("--repeats", type=positive, help="alternating ours/baseline rounds (quick 3, full 3)")
    parser.add_argument("--workers", type=positive, help="Ray CPUs = DataLoader workers (default: the cores)")
    parser.add_argument(
        "--load-batch-size", type=positive, default=32, help="rows per map_batches call (data.load_batch_size)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    patients = (60 if args.quick else 400) if args.patients is None else args.patients
    synth_size = tuple(((512, 416) if args.quick else (1024, 832)) if args.synth_size is None else args.synth_size)
    image_size = tuple(((512, 256) if args.quick else (1024, 512)) if args.image_size is None else args.image_size)
    epochs = (20 if args.quick else 8) if args.epochs is None else args.epochs
    repeats = 3 if args.repeats is None else args.repeats
    workers = common.cores() if args.workers is None else args.workers

    num_cpus = common.start_ray(workers)
    import torch
    from torch.utils.data import DataLoader

    from mammo_ray import data

    paths = common.prepared_synthetic(patients, synth_size, image_size)
    frame = common.load_frames({"train": paths["train"]})["train"]
    n_rows = len(frame)
    dataset = data.make_dataset(
        frame,
        image_size=image_size,
        use_cache=True,
        shuffle_seed=0,
        augment_images=False,
        load_batch_size=args.load_batch_size,
        # As data.training_datasets sizes a trial's passes: one pass covers the run (here the warm-up, of up to
        # 20 epochs, and the timed epochs).
        epochs_per_pass=data.epochs_per_pass(
            n_rows, (epochs + 20) * math.ceil(n_rows / args.batch_size) * args.batch_size
        ),
    )
    # A Train worker's dataset runs with the trainer's ingest options (train.make_trainer passes them through
    # DataConfig; today they add preserve_order for a reproducible order), so the driver uses the same.
    options = train_ingest_options()
    dataset = dataset.copy(dataset)
    dataset.context.execution_options = options
    loader = DataLoader(
        CacheDataset(frame, image_size),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
        # forkserver: forking a process that runs Ray's gRPC threads is unsafe.
        multiprocessing_context="forkserver",
        generator=torch.Generator().manual_seed(0),
    )
    ours_runs, base_runs = [], []
    for round_number in range(repeats):
        ours_runs.append(run_ours(dataset, n_rows, args.batch_size, epochs, args.warmup_s))
        base_runs.append(run_baseline(loader, epochs, args.warmup_s))
        print(
            f"round {round_number + 1}/{repeats}: ours {ours_runs[-1]['images_per_s']:.1f} images/s, "
            f"DataLoader {base_runs[-1]['images_per_s']:.1f} images/s",
            file=sys.stderr,
        )
    ours = statistics.median(r["images_per_s"] for r in ours_runs)
    baseline = statistics.median(r["images_per_s"] for r in base_runs)
    cache_bytes = int(frame["cache_nbytes"].sum())
    params = {
        "mode": "quick" if args.quick else "full",
        "images_per_epoch": n_rows,
        "split": "train",
        "synth_patients": patients,
        "synth_size": list(synth_size),
        "image_size": list(image_size),
        "batch_size": args.batch_size,
        "timed_epochs": epochs,
        "warmup": f"whole epochs, at least one and at least {args.warmup_s} s, of each round not timed",
        "repeats": repeats,
        "statistic": "median over rounds" if repeats > 1 else "single round",
        "ray_num_cpus": num_cpus,
        "dataloader_workers": workers,
        "load_batch_size": args.load_batch_size,
        "augment": False,
        "ours_execution_options": {
            "preserve_order": options.preserve_order,
            "locality_with_output": options.locality_with_output,
            "resource_limits": str(options.resource_limits),
        },
        "ours_path": (
            "data.make_dataset(shuffle_seed=0, epochs_per_pass) -> data.CyclingStream.take(B) (iter_batches numpy, "
            "prefetch 2, uint16) -> data.to_model_input"
        ),
        "baseline_path": "DataLoader(shuffle, persistent forkserver workers) over cache.read_image + same normalisation",
        "cache_mib": round(cache_bytes / 2**20, 1),
        "delivered_batch_shape": list(ours_runs[0]["shape"]),
    }
    extra = {
        "ours_rounds": [round(r["images_per_s"], 2) for r in ours_runs],
        "baseline_rounds": [round(r["images_per_s"], 2) for r in base_runs],
        "ours_warmup_s": [round(r["warmup_s"], 2) for r in ours_runs],
        "baseline_warmup_s": [round(r["warmup_s"], 2) for r in base_runs],
        "ours_passes_per_round": [r["passes"] for r in ours_runs],
        "ours_epoch_images_per_s": [r["epoch_images_per_s"] for r in ours_runs],
        "baseline_epoch_images_per_s": [r["epoch_images_per_s"] for r in base_runs],
    }
    del loader
    common.finish(
        "ingest",
        ours=ours,
        baseline=baseline,
        unit="images/s",
        params=params,
        out=args.out,
        target_ratio=1.0,
        extra=extra,
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
