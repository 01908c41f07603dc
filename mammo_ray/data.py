"""Ray Data pipelines: manifest rows → pixels (cache or on-the-fly decode) → augmentation → workers.

Each Train worker gets its own datasets, built here in the trial process from the validated
manifest: ``train_{rank}`` (natural ratio, or the class-aware sampler's planned batches) and
``valid_{rank}``. Every image belongs to exactly one rank, so

* validation sees every image exactly once across ranks (Ray's ``streaming_split(equal=True)``
  drops rows to equalise shards, which would bias the validation AUC);
* a rank cycles its stream without waiting on other ranks.

Class-aware samplers (``balanced``, ``weighted``) are planned here, not in the worker: :func:`class_aware_rows`
lays out a rank's batches row by row (how many positives each batch holds, and which ones) and the rank streams
them in that order (Train keeps the order, ``preserve_order``), so each rank reads one training stream whatever the
sampler. Two streams per rank (one per class) cost 2.5-3x in training speed on a 2-core machine, because Ray Data
splits its spare CPU budget between streams in whole CPUs and one of them would wait with none.

Only the small metadata rows are shuffled; the pixels are read afterwards, by random access into the
cache, inside ``map_batches`` tasks that stream to the workers. Without a cache the same tasks decode
the files themselves. One execution (pass) of a training dataset holds several epochs' worth of rows,
each copy of the rows in its own seeded order (``epochs_per_pass``), because every pass costs a
restart of Ray Data's streaming executor, and a stream that restarts once per epoch (or, for the
positives of a class-aware sampler, several times per epoch) waits on it each time.

Images travel as uint16 (N, 1, H, W), half the bytes of float32 through the object store and the
host-to-device copy; :func:`to_model_input` scales and normalises them on the consumer's device.

Every dataset built here carries :class:`mammo_ray.data_pace.SchedulerPace`, which keeps Ray Data's scheduling
loop from spinning in the worker while the worker has data waiting (see that module).
"""

from __future__ import annotations

import zlib
from functools import partial

import numpy as np
import pandas as pd

from mammo_ray import augment, cache, manifest

# Grey-level normalisation: the ImageNet RGB statistics averaged over channels, so that a stem whose
# RGB weights were summed into one channel (model.create_model) sees inputs on the scale it was trained on.
MEAN = 0.449
STD = 0.226
PIXEL_SCALE = 65535.0
# The column make_dataset adds to an augmented stream: each row's position in the pass, which seeds its draw.
DRAW_COLUMN = "draw"


def resize_uint16(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a cached image whose size differs from ``data.image_size`` (area interpolation when shrinking).

    Manifests whose cache is smaller than ``data.image_size`` are refused before a run starts
    (:func:`mammo_ray.manifest.check_cache_size`), so in a run this only shrinks.
    """
    import cv2

    height, width = size
    if image.shape == (height, width):
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] >= height else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def decode_rows_uint16(
    batch: dict[str, np.ndarray],
    image_size: tuple[int, int],
    use_cache: bool,
    *,
    decode_size: tuple[int, int] | None = None,
    reduced_decode: bool = True,
) -> np.ndarray:
    """Pixels of a batch of manifest rows as uint16 (N, H, W), as the cache holds them.

    Files are preprocessed at ``decode_size`` (default ``image_size``) with ``reduced_decode``, then resized to
    ``image_size`` as a cached image is: ``predict`` passes the training cache's size and decode setting, so that a
    raw file is made the way the model's training images were (``export.preprocessing_record``).
    """
    if use_cache and "cache_file" in batch:
        images = cache.read_images(batch)
    else:
        from mammo_ray import imaging

        size = tuple(decode_size or image_size)
        images = []
        for path, laterality in zip(batch["path"], batch["laterality"], strict=True):
            side = laterality if laterality in ("L", "R") else None
            images.append(imaging.preprocess_file(path, size=size, laterality=side, reduced_decode=reduced_decode)[0])
    return np.stack([resize_uint16(img, image_size) for img in images])


def decode_rows(batch: dict[str, np.ndarray], image_size: tuple[int, int], use_cache: bool, **options) -> np.ndarray:
    """Pixels of a batch of manifest rows as float32 (N, H, W) in [0, 1]; ``options`` as :func:`decode_rows_uint16`'s."""
    return decode_rows_uint16(batch, image_size, use_cache, **options).astype(np.float32) / PIXEL_SCALE


def normalise(images01: np.ndarray) -> np.ndarray:
    """float32 (N, H, W) in [0, 1] → model input (N, 1, H, W)."""
    return ((images01 - MEAN) / STD)[:, None, :, :].astype(np.float32, copy=False)


def quantise(images01: np.ndarray) -> np.ndarray:
    """float32 (N, H, W) in [0, 1] → uint16 (N, 1, H, W), the form batches travel in (step 1/65535)."""
    scaled = np.clip(images01, 0.0, 1.0) * np.float32(PIXEL_SCALE) + np.float32(0.5)
    return scaled.astype(np.uint16)[:, None, :, :]


def to_model_input(images):
    """A uint16 batch tensor (N, 1, H, W) from :func:`load_batch` → normalised float32, on its device.

    Float tensors pass through unchanged (already model input)."""
    import torch

    if images.dtype.is_floating_point:
        return images
    if images.dtype != torch.uint16:
        raise TypeError(f"image batches are uint16 or float, got {images.dtype}")
    scale = 1.0 / (PIXEL_SCALE * STD)
    return images.to(torch.float32).mul_(scale).sub_(MEAN / STD)


def load_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: tuple[int, int],
    use_cache: bool,
    augment_images: bool = False,
    seed: int = 0,
    positive_strength: float = 1.0,
) -> dict[str, np.ndarray]:
    """The ``map_batches`` function: metadata rows in, uint16 images (see :func:`quantise`) plus metadata out."""
    import cv2

    cv2.setNumThreads(1)  # one Ray Data task per CPU: OpenCV's own thread pool would oversubscribe it
    pixels = decode_rows_uint16(batch, image_size, use_cache)
    labels = batch["label"].astype(np.int64)
    out = {column: batch[column] for column in manifest.STREAM_COLUMNS if column in batch and column != "path"}
    if augment_images:
        # Each row's draw is salted with its position in the pass (DRAW_COLUMN), so an image gets a new draw
        # every time it comes round, and the draws do not depend on how Ray Data cuts the pass into blocks and
        # batches (that depends on the pass length and the cluster's CPUs). A batch without the column (a
        # direct call) counts positions from its first row.
        draws = batch[DRAW_COLUMN] if DRAW_COLUMN in batch else np.arange(len(labels))
        seeds = np.array(
            [
                augment.row_seed(seed, image_id, int(draw))
                for image_id, draw in zip(batch["image_id"], draws, strict=True)
            ]
        )
        # The view decides whether a vertical flip is anatomically possible (augment.flips_vertically); a batch
        # without the column (a direct call) has no known view, so it is not flipped.
        views = batch["view"] if "view" in batch else [None] * len(labels)
        images = augment.augment_images(
            pixels.astype(np.float32) / PIXEL_SCALE, labels, seeds, positive_strength, views=views
        )
        out["image"] = quantise(images)
    else:
        out["image"] = pixels[:, None]  # the cached values themselves: no float round trip
    out["label"] = labels.astype(np.float32)
    return out


def _metadata_columns(frame: pd.DataFrame, use_cache: bool) -> list[str]:
    columns = [c for c in manifest.STREAM_COLUMNS if c in frame.columns]
    if use_cache and manifest.has_cache(frame):
        columns += ["cache_file", "cache_offset", "cache_nbytes", "cache_height", "cache_width"]
    return columns


def make_dataset(
    frame: pd.DataFrame,
    *,
    image_size: tuple[int, int],
    use_cache: bool,
    shuffle_seed: int | None = None,
    augment_images: bool = False,
    augment_seed: int = 0,
    positive_strength: float = 1.0,
    load_batch_size: int = 32,
    epochs_per_pass: int = 1,
):
    """One streamed dataset over ``frame``'s rows.

    Args:
        shuffle_seed: when set, the metadata rows are shuffled in an order derived from this seed.
        epochs_per_pass: with ``shuffle_seed``, one execution yields this many copies of the rows, each
            in its own seeded order, so that a consumer sees every row once before any row twice and
            the executor restarts once per ``epochs_per_pass`` epochs. A re-execution repeats the
            same sequence (as a re-run with the same seed would).
    """
    import ray.data

    use_cache = use_cache and manifest.has_cache(frame)
    rows = frame[_metadata_columns(frame, use_cache)].reset_index(drop=True)
    if epochs_per_pass < 1:
        raise ValueError(f"epochs_per_pass must be at least 1, got {epochs_per_pass}")
    if shuffle_seed is not None and len(rows):
        order = _cycled_permutations(len(rows), len(rows) * epochs_per_pass, shuffle_seed)
        rows = rows.iloc[order].reset_index(drop=True)
    if augment_images:
        rows[DRAW_COLUMN] = np.arange(len(rows), dtype=np.int64)
    # Split into blocks here: from_pandas(override_num_blocks=...) breaks on pandas 3 frames (Ray 2.60).
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    bounds = block_bounds(len(rows), load_batch_size, cpus)
    dataset = ray.data.from_pandas([rows.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a])
    fn = partial(
        load_batch,
        image_size=tuple(image_size),
        use_cache=use_cache,
        augment_images=augment_images,
        seed=augment_seed,
        positive_strength=positive_strength,
    )
    from mammo_ray.data_pace import paced

    return paced(dataset.map_batches(fn, batch_size=load_batch_size, batch_format="numpy"))


# Each block of metadata rows becomes one map task. Several blocks let a multi-CPU node load pixels in
# parallel, but every task pays a start-up (scheduling, fetching its block, a new output stream), so:
# blocks of at least MIN_BLOCK_ROWS rows, at most MAX_BLOCKS of them; a pass too short for that still gets
# BLOCKS_PER_CPU blocks per cluster CPU and at least MIN_BLOCKS (of 4 load batches each, where it has the
# rows), so that a small data set on a many-CPU GPU node is still loaded by all its CPUs.
# Measured with ``benchmarks/ingest.py --quick`` (a 12,848-row pass of 512x256 images, 2 CPUs), against the
# DataLoader baseline: blocks of 200 rows 0.94x, 800 rows 1.05x, 1,600 rows 1.16-1.19x, 3,200 rows 1.17x,
# 6,400 rows (one task per CPU, nothing to overlap) 0.90x. Without preserve_order, 200 rows gave 0.88x: the
# ordered hand-over is not what costs.
MIN_BLOCK_ROWS = 1536
MIN_BLOCKS = 4
BLOCKS_PER_CPU = 2
MAX_BLOCKS = 64


def block_bounds(n_rows: int, load_batch_size: int, cpus: int = 1) -> np.ndarray:
    """Row offsets that split ``n_rows`` metadata rows into the blocks :func:`make_dataset` streams, for a
    cluster of ``cpus`` CPUs."""
    by_size = n_rows // MIN_BLOCK_ROWS
    floor = min(max(MIN_BLOCKS, BLOCKS_PER_CPU * cpus), n_rows // max(1, load_batch_size * 4))
    blocks = max(1, min(MAX_BLOCKS, max(by_size, floor)))
    return np.linspace(0, n_rows, blocks + 1).astype(int)


# Most metadata rows one pass of a training stream holds: a few tens of MB in the object store. Past that,
# restarts are rare enough not to matter.
PASS_ROWS = 200_000


def epochs_per_pass(n_rows: int, rows_needed: int | None) -> int:
    """Copies of an ``n_rows`` stream per pass so that one pass yields ``rows_needed`` rows (capped)."""
    if not rows_needed or n_rows <= 0:
        return 1
    return max(1, min(-(-rows_needed // n_rows), PASS_ROWS // n_rows))


def rank_partition(frame: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """Rank ``rank``'s share of ``frame``: every row in exactly one share, grouped by patient.

    Rows are assigned by a hash of the patient id, so a patient's images stay on one worker; the
    shares differ in size by a few patients at most.
    """
    keys = np.array([zlib.crc32(str(p).encode()) % world_size for p in frame["patient_id"]])
    return frame[keys == rank]


def training_datasets(
    frames: dict[str, pd.DataFrame],
    *,
    num_workers: int,
    sampler: str,
    image_size: tuple[int, int],
    use_cache: bool,
    seed: int,
    augment_images: bool,
    positive_strength: float,
    load_batch_size: int,
    rows_per_rank: int | None = None,
    batch_size: int | None = None,
    steps_per_epoch: int | None = None,
    positive_fraction: float = 0.5,
) -> dict:
    """All datasets a trial's workers need, keyed by name (see the module docstring).

    Args:
        rows_per_rank: training rows one rank takes over the whole run (epochs x steps x batch size); each
            training stream's pass then covers it where that fits in :data:`PASS_ROWS` rows.
        batch_size, steps_per_epoch: rows per step and steps per epoch on each rank; the class-aware samplers
            need them (and ``rows_per_rank``) to plan their batches.
        positive_fraction: the ``weighted`` sampler's expected share of positives per batch.
    """
    common = dict(image_size=image_size, use_cache=use_cache, load_batch_size=load_batch_size)
    train = frames["train"]
    datasets = {}

    def train_dataset(rows: pd.DataFrame, shuffle_seed: int, **kwargs):
        return make_dataset(
            rows, shuffle_seed=shuffle_seed, epochs_per_pass=epochs_per_pass(len(rows), rows_per_rank), **kwargs
        )

    for rank in range(num_workers):
        share = rank_partition(train, rank, num_workers)
        if share.empty:
            raise ValueError(f"worker {rank} of {num_workers} gets no training rows; use fewer workers")
        train_kwargs = dict(
            augment_images=augment_images, augment_seed=seed + 7 * rank, positive_strength=positive_strength, **common
        )
        if sampler == "simple":
            datasets[f"train_{rank}"] = train_dataset(share, seed * 1000 + rank, **train_kwargs)
        else:
            positives, negatives = share[share["label"] == 1], share[share["label"] == 0]
            if positives.empty or negatives.empty:
                # A rank without one class cannot form class-aware batches; fall back to the whole set.
                positives = positives if not positives.empty else train[train["label"] == 1]
                negatives = negatives if not negatives.empty else train[train["label"] == 0]
            if positives.empty or negatives.empty:
                raise ValueError(f"the {sampler} sampler needs both classes in the training manifest")
            if not (batch_size and steps_per_epoch and rows_per_rank):
                raise ValueError(f"the {sampler} sampler needs batch_size, steps_per_epoch and rows_per_rank")
            rows = class_aware_rows(
                positives, negatives, sampler=sampler, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                epochs=max(1, rows_per_rank // (batch_size * steps_per_epoch)), positive_fraction=positive_fraction,
                seed=seed, rank=rank,
            )  # fmt: skip
            datasets[f"train_{rank}"] = make_dataset(rows, **train_kwargs)
        valid_share = rank_partition(frames["valid"], rank, num_workers)
        if not valid_share.empty:
            datasets[f"valid_{rank}"] = make_dataset(valid_share, **common)
    return datasets


def class_aware_rows(
    positives: pd.DataFrame,
    negatives: pd.DataFrame,
    *,
    sampler: str,
    batch_size: int,
    steps_per_epoch: int,
    epochs: int,
    positive_fraction: float,
    seed: int,
    rank: int,
) -> pd.DataFrame:
    """One rank's training rows in the order a class-aware sampler takes them, batch after batch.

    Epoch ``e`` (from 1) holds ``steps_per_epoch`` batches; batch ``i`` takes :func:`positives_per_batch`'s count
    of positives (drawn with the generator seeded ``[seed, e, rank]``), then the rest of the batch in negatives.
    Each class is taken in seeded permutations, one after another, so every row of a class comes once before any
    comes twice. The plan holds ``epochs`` epochs, or as many whole epochs as fit in :data:`PASS_ROWS` rows (at
    least one); a stream that reaches its end starts the plan again.

    Returns:
        The metadata rows, repeated and ordered; ``len`` is a multiple of ``batch_size``.
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"need at least one step and one epoch, got {steps_per_epoch} and {epochs}")
    planned = max(1, min(epochs, PASS_ROWS // (steps_per_epoch * batch_size)))
    plan = np.concatenate(
        [
            positives_per_batch(sampler, batch_size, steps_per_epoch, positive_fraction, _rng(seed, epoch, rank))
            for epoch in range(1, planned + 1)
        ]
    )
    # Slot j of batch i holds a positive when j < plan[i]: each batch its positives, then its negatives.
    positive_slot = (np.arange(batch_size)[None, :] < plan[:, None]).ravel()
    n_positive = int(positive_slot.sum())
    order = np.empty(len(positive_slot), dtype=np.int64)
    order[positive_slot] = _cycled_permutations(len(positives), n_positive, seed * 1000 + rank)
    order[~positive_slot] = len(positives) + _cycled_permutations(
        len(negatives), len(order) - n_positive, seed * 1000 + 500 + rank
    )
    both = pd.concat([positives, negatives], ignore_index=True)  # row indices into both classes at once
    return both.iloc[order].reset_index(drop=True)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _cycled_permutations(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` indices into ``n`` rows: seeded permutations one after another (copy ``c`` from ``[seed, c]``)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    copies = -(-count // n)
    return np.concatenate([_rng(seed, copy).permutation(n) for copy in range(copies)])[:count]


def positives_per_batch(
    sampler: str, batch_size: int, steps: int, positive_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """How many positives each of ``steps`` batches holds.

    ``balanced``: exactly half of every batch. ``weighted``: a Binomial(B, p) draw per batch, which is
    what drawing each slot with replacement at probability p gives, so the epoch's share of
    positives matches p within sampling error.
    """
    if sampler == "balanced":
        if batch_size % 2:
            raise ValueError(f"the balanced sampler needs an even batch size, got {batch_size}")
        return np.full(steps, batch_size // 2, dtype=np.int64)
    if sampler == "weighted":
        return rng.binomial(batch_size, positive_fraction, size=steps).astype(np.int64)
    raise ValueError(f"no per-batch plan for sampler {sampler!r}")


class CyclingStream:
    """Rows from a dataset iterator, taken in any amount; starts a new pass when one ends.

    Each pass re-executes the dataset; a training dataset's pass holds one seeded permutation per epoch
    (``make_dataset(epochs_per_pass=...)``), so a class is covered without repeats before any repeats.
    The stream lives across epochs: an epoch boundary does not reset it.
    """

    def __init__(self, iterator, chunk_size: int = 16, prefetch_batches: int = 2):
        self._iterator = iterator
        self._chunk_size = chunk_size
        self._prefetch = prefetch_batches
        self._pending: list[dict[str, np.ndarray]] = []
        self._source = None
        self.passes = 0
        self.rows_taken = 0

    def _next_chunk(self) -> dict[str, np.ndarray]:
        for _ in range(2):
            if self._source is None:
                self._source = iter(
                    self._iterator.iter_batches(
                        batch_size=self._chunk_size, batch_format="numpy", prefetch_batches=self._prefetch
                    )
                )
                self.passes += 1
            try:
                return next(self._source)
            except StopIteration:
                self._source = None
        raise RuntimeError("dataset stream is empty")

    def close(self) -> None:
        """End the current pass now: its streaming executor shuts down and gives back its Ray Data budget.

        A pass left open holds its budget with Ray Data's cluster-wide autoscaling coordinator until the
        request expires (minutes), so a stream that is not drained is closed rather than left to garbage
        collection. The next :meth:`take` starts a new pass.
        """
        source, self._source = self._source, None
        self._pending = []
        if source is not None and hasattr(source, "close"):
            source.close()

    def take(self, n: int) -> dict[str, np.ndarray] | None:
        """The next ``n`` rows. A take that one chunk covers returns views of it, without copying."""
        if n <= 0:
            return None
        parts, have = [], 0
        while have < n:
            if not self._pending:
                self._pending.append(self._next_chunk())
            chunk = self._pending[0]
            size, need = len(chunk["label"]), n - have
            if size <= need:
                parts.append(self._pending.pop(0))
                have += size
            else:
                parts.append({k: v[:need] for k, v in chunk.items()})
                self._pending[0] = {k: v[need:] for k, v in chunk.items()}
                have = n
        self.rows_taken += n
        return parts[0] if len(parts) == 1 else concat_batches(parts)


def concat_batches(parts: list[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p is not None]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
