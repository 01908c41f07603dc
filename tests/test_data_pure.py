"""Tests for the pure parts of mammo_ray.data (no Ray): batch plans, rank shares, the cycling stream, batch loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammo_ray import cache, data

# --------------------------------------------------------------------------------------------------
# positives_per_batch


@pytest.mark.parametrize(("batch_size", "steps"), [(2, 1), (8, 5), (32, 100), (64, 3)])
def test_balanced_is_exactly_half(batch_size: int, steps: int) -> None:
    plan = data.positives_per_batch("balanced", batch_size, steps, 0.9, np.random.default_rng(0))
    assert plan.dtype == np.int64
    assert plan.tolist() == [batch_size // 2] * steps


@pytest.mark.parametrize("batch_size", [1, 3, 31])
def test_balanced_refuses_odd_batch_size(batch_size: int) -> None:
    with pytest.raises(ValueError, match="even"):
        data.positives_per_batch("balanced", batch_size, 4, 0.5, np.random.default_rng(0))


@pytest.mark.parametrize(("batch_size", "fraction"), [(32, 0.125), (16, 0.5), (8, 0.3), (64, 0.05), (2, 0.5)])
def test_weighted_share_matches_the_target(batch_size: int, fraction: float) -> None:
    steps = 2000
    plan = data.positives_per_batch("weighted", batch_size, steps, fraction, np.random.default_rng(1))
    assert plan.shape == (steps,)
    assert plan.min() >= 0 and plan.max() <= batch_size
    share = plan.sum() / (batch_size * steps)
    standard_error = np.sqrt(fraction * (1 - fraction) / (batch_size * steps))
    assert abs(share - fraction) <= 3 * standard_error, (share, fraction, standard_error)
    assert len(set(plan.tolist())) > 1, "the number of positives should vary from batch to batch"


def test_weighted_is_reproducible() -> None:
    def plan(seed: int) -> list[int]:
        return data.positives_per_batch("weighted", 32, 50, 0.25, np.random.default_rng(seed)).tolist()

    assert plan(7) == plan(7)
    assert plan(7) != plan(8)


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (1.0, 16)])
def test_weighted_degenerate_fractions(fraction: float, expected: int) -> None:
    plan = data.positives_per_batch("weighted", 16, 10, fraction, np.random.default_rng(0))
    assert plan.tolist() == [expected] * 10


@pytest.mark.parametrize("sampler", ["balanced", "weighted"])
def test_zero_steps(sampler: str) -> None:
    assert data.positives_per_batch(sampler, 8, 0, 0.5, np.random.default_rng(0)).shape == (0,)


@pytest.mark.parametrize("sampler", ["simple", "random", ""])
def test_no_plan_for_other_samplers(sampler: str) -> None:
    with pytest.raises(ValueError, match="sampler"):
        data.positives_per_batch(sampler, 8, 4, 0.5, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------
# class_aware_rows: a class-aware sampler's batches, planned into one stream's row order


def _classes(n_pos: int, n_neg: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    pos = pd.DataFrame({"image_id": [f"p{i}" for i in range(n_pos)], "label": 1})
    neg = pd.DataFrame({"image_id": [f"n{i}" for i in range(n_neg)], "label": 0})
    return pos, neg


@pytest.mark.parametrize(("sampler", "fraction"), [("balanced", 0.5), ("weighted", 0.3), ("weighted", 0.05)])
def test_class_aware_rows_follow_the_batch_plan(sampler: str, fraction: float) -> None:
    pos, neg = _classes(7, 50)
    batch, steps, epochs, seed, rank = 8, 5, 3, 4, 1
    rows = data.class_aware_rows(
        pos, neg, sampler=sampler, batch_size=batch, steps_per_epoch=steps, epochs=epochs,
        positive_fraction=fraction, seed=seed, rank=rank,
    )  # fmt: skip
    assert len(rows) == batch * steps * epochs
    counts = rows["label"].to_numpy().reshape(-1, batch).sum(axis=1)
    expected = np.concatenate(
        [
            data.positives_per_batch(sampler, batch, steps, fraction, np.random.default_rng([seed, epoch, rank]))
            for epoch in range(1, epochs + 1)
        ]
    )
    assert counts.tolist() == expected.tolist()
    for label, frame in ((1, pos), (0, neg)):
        taken = rows.loc[rows["label"] == label, "image_id"].tolist()
        n = len(frame)
        # Every row of a class once before any twice: each full run of n takes is a permutation.
        for start in range(0, len(taken) - n + 1, n):
            assert sorted(taken[start : start + n]) == sorted(frame["image_id"])
        assert len(set(taken[: min(n, len(taken))])) == min(n, len(taken))


def test_class_aware_rows_are_reproducible_and_rank_specific() -> None:
    pos, neg = _classes(5, 40)

    def ids(seed: int, rank: int) -> list[str]:
        return data.class_aware_rows(
            pos, neg, sampler="weighted", batch_size=8, steps_per_epoch=4, epochs=2, positive_fraction=0.5,
            seed=seed, rank=rank,
        )["image_id"].tolist()  # fmt: skip

    assert ids(0, 0) == ids(0, 0)
    assert ids(0, 0) != ids(0, 1)
    assert ids(0, 0) != ids(1, 0)


def test_class_aware_rows_cap_a_pass_at_whole_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "PASS_ROWS", 100)
    pos, neg = _classes(3, 30)
    rows = data.class_aware_rows(
        pos, neg, sampler="balanced", batch_size=8, steps_per_epoch=4, epochs=10, positive_fraction=0.5, seed=0, rank=0
    )
    assert len(rows) == 3 * 4 * 8  # three whole epochs fit in 100 rows; the stream starts the plan again


def test_balanced_plan_refuses_odd_batches_before_any_worker_starts() -> None:
    pos, neg = _classes(3, 30)
    with pytest.raises(ValueError, match="even"):
        data.class_aware_rows(
            pos, neg, sampler="balanced", batch_size=7, steps_per_epoch=2, epochs=1, positive_fraction=0.5, seed=0,
            rank=0,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# rank_partition


def _frame(n_patients: int, images_per_patient: int = 4) -> pd.DataFrame:
    rows = [
        {"image_id": f"p{p}-i{i}", "patient_id": f"p{p}", "label": int(p % 5 == 0)}
        for p in range(n_patients)
        for i in range(images_per_patient)
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n_patients", [1, 2, 7, 60])
def test_rank_partition_covers_every_row_once(world_size: int, n_patients: int) -> None:
    frame = _frame(n_patients)
    shares = [data.rank_partition(frame, rank, world_size) for rank in range(world_size)]
    ids = [image_id for share in shares for image_id in share["image_id"]]
    assert sorted(ids) == sorted(frame["image_id"]), "every row in exactly one share"
    owners: dict[str, set[int]] = {}
    for rank, share in enumerate(shares):
        for patient in share["patient_id"]:
            owners.setdefault(patient, set()).add(rank)
    assert all(len(ranks) == 1 for ranks in owners.values()), "a patient's rows must stay on one rank"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_partition_is_stable_and_roughly_even(world_size: int) -> None:
    frame = _frame(400, 1)
    first = [data.rank_partition(frame, r, world_size)["image_id"].tolist() for r in range(world_size)]
    shuffled = frame.sample(frac=1.0, random_state=0)
    again = [sorted(data.rank_partition(shuffled, r, world_size)["image_id"]) for r in range(world_size)]
    assert [sorted(x) for x in first] == again, "a patient's rank must not depend on the row order"
    sizes = [len(x) for x in first]
    assert min(sizes) > 0.6 * 400 / world_size


def test_rank_partition_empty_frame() -> None:
    empty = pd.DataFrame({"image_id": [], "patient_id": [], "label": []})
    assert data.rank_partition(empty, 0, 2).empty


def test_rank_partition_numeric_patient_ids() -> None:
    frame = pd.DataFrame({"patient_id": [1, 1, 2, 3, 3, 3], "image_id": list("abcdef")})
    shares = [data.rank_partition(frame, r, 2) for r in range(2)]
    assert sorted(x for s in shares for x in s["image_id"]) == list("abcdef")


# --------------------------------------------------------------------------------------------------
# CyclingStream


class FakeDataset:
    """Stands in for a Ray DataIterator: each pass yields the rows in a new seeded order, in numpy chunks."""

    def __init__(self, n_rows: int, seed: int = 0) -> None:
        self.n_rows = n_rows
        self.rng = np.random.default_rng(seed)
        self.calls: list[dict] = []

    def iter_batches(self, *, batch_size: int, batch_format: str, prefetch_batches: int):
        self.calls.append({"batch_size": batch_size, "batch_format": batch_format, "prefetch": prefetch_batches})
        order = self.rng.permutation(self.n_rows)
        for start in range(0, self.n_rows, batch_size):
            ids = order[start : start + batch_size]
            yield {"row": ids.astype(np.int64), "label": (ids % 2).astype(np.float32), "image_id": ids.astype(str)}


@pytest.mark.parametrize(("n_rows", "chunk", "n"), [(10, 4, 3), (10, 4, 10), (10, 3, 25), (7, 16, 5), (5, 2, 1)])
def test_take_returns_exactly_n_rows(n_rows: int, chunk: int, n: int) -> None:
    stream = data.CyclingStream(FakeDataset(n_rows), chunk_size=chunk)
    batch = stream.take(n)
    assert batch is not None
    assert set(batch) == {"row", "label", "image_id"}
    assert all(len(v) == n for v in batch.values())
    assert stream.rows_taken == n


def test_iter_batches_arguments() -> None:
    dataset = FakeDataset(10)
    data.CyclingStream(dataset, chunk_size=6, prefetch_batches=3).take(1)
    assert dataset.calls == [{"batch_size": 6, "batch_format": "numpy", "prefetch": 3}]


@pytest.mark.parametrize(("n_rows", "chunk", "take"), [(10, 4, 3), (9, 3, 3), (12, 5, 7), (7, 2, 1), (5, 8, 2)])
def test_every_row_of_a_pass_before_any_repeat(n_rows: int, chunk: int, take: int) -> None:
    stream = data.CyclingStream(FakeDataset(n_rows), chunk_size=chunk)
    rows: list[int] = []
    for _ in range(5 * n_rows // take + 1):
        rows.extend(stream.take(take)["row"].tolist())
    for start in range(0, len(rows) - n_rows + 1, n_rows):
        window = rows[start : start + n_rows]
        assert sorted(window) == list(range(n_rows)), f"pass starting at row {start} is not a permutation: {window}"


def test_passes_counter_crosses_boundaries() -> None:
    stream = data.CyclingStream(FakeDataset(10), chunk_size=4)
    assert stream.passes == 0
    stream.take(6)
    assert stream.passes == 1
    stream.take(4)  # exactly the end of the first pass
    assert stream.passes == 1
    stream.take(1)
    assert stream.passes == 2
    stream.take(25)  # crosses two more boundaries in one take
    assert stream.passes == 4
    assert stream.rows_taken == 36


def test_rows_carry_over_between_takes() -> None:
    stream = data.CyclingStream(FakeDataset(20), chunk_size=8)
    first, second = stream.take(3), stream.take(3)
    assert len(set(first["row"]) | set(second["row"])) == 6
    # Columns stay aligned row by row.
    np.testing.assert_array_equal(second["label"], (second["row"] % 2).astype(np.float32))
    np.testing.assert_array_equal(second["image_id"], second["row"].astype(str))


@pytest.mark.parametrize("n", [0, -1])
def test_take_nothing_returns_none(n: int) -> None:
    dataset = FakeDataset(10)
    stream = data.CyclingStream(dataset)
    assert stream.take(n) is None
    assert dataset.calls == [], "taking nothing must not start a pass"
    assert stream.rows_taken == 0


def test_empty_dataset_raises() -> None:
    with pytest.raises(RuntimeError, match="empty"):
        data.CyclingStream(FakeDataset(0)).take(1)


def test_take_within_one_chunk_returns_views() -> None:
    class Chunks:
        def __init__(self):
            self.chunk = {"row": np.arange(8), "label": np.zeros(8, dtype=np.float32)}

        def iter_batches(self, **_):
            yield self.chunk

    source = Chunks()
    stream = data.CyclingStream(source, chunk_size=8)
    first, second = stream.take(5), stream.take(3)
    assert np.shares_memory(first["row"], source.chunk["row"]), "a take inside one chunk must not copy"
    assert np.shares_memory(second["row"], source.chunk["row"])
    assert first["row"].tolist() == [0, 1, 2, 3, 4] and second["row"].tolist() == [5, 6, 7]
    across = stream.take(10)  # spans passes: a new array
    assert across["row"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]


def test_concat_batches_skips_none() -> None:
    stream = data.CyclingStream(FakeDataset(10), chunk_size=4)
    merged = data.concat_batches([stream.take(3), None, stream.take(2)])
    assert len(merged["row"]) == 5


# --------------------------------------------------------------------------------------------------
# quantise, to_model_input, epochs_per_pass


def test_quantise_then_to_model_input_matches_normalise() -> None:
    import torch

    images01 = np.random.default_rng(0).random((3, 8, 6), dtype=np.float32)
    images01[0, 0, :3] = [0.0, 1.0, 0.5]
    restored = data.to_model_input(torch.from_numpy(data.quantise(images01))).numpy()
    np.testing.assert_allclose(restored, data.normalise(images01), atol=1.0 / (data.PIXEL_SCALE * data.STD))
    assert restored.dtype == np.float32 and restored.shape == (3, 1, 8, 6)


def test_quantise_clips_and_rounds() -> None:
    out = data.quantise(np.array([[[-0.2, 0.0, 0.5, 1.0, 1.3]]], dtype=np.float32))
    assert out.dtype == np.uint16 and out.shape == (1, 1, 1, 5)
    assert out.ravel().tolist() == [0, 0, 32768, 65535, 65535]


def test_to_model_input_passes_floats_and_rejects_other_integers() -> None:
    import torch

    floats = torch.zeros(2, 1, 4, 4)
    assert data.to_model_input(floats) is floats
    with pytest.raises(TypeError, match="uint16"):
        data.to_model_input(torch.zeros(2, 1, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize(
    ("n_rows", "needed", "expected"),
    [(100, None, 1), (100, 50, 1), (100, 100, 1), (100, 101, 2), (100, 2_000, 20), (100_000, 10**7, 2), (0, 10, 1)],
)
def test_epochs_per_pass(n_rows: int, needed: int | None, expected: int) -> None:
    assert data.epochs_per_pass(n_rows, needed) == expected
    assert expected * max(n_rows, 1) <= max(data.PASS_ROWS, n_rows)


@pytest.mark.parametrize("n_rows", [0, 1, 127, 128, 500, 960, 1536, 6_144, 12_848, 20_000, 98_304, 200_000, 10**6])
@pytest.mark.parametrize("load_batch_size", [8, 32])
@pytest.mark.parametrize("cpus", [1, 16, 200])
def test_block_bounds_tile_the_rows(n_rows: int, load_batch_size: int, cpus: int) -> None:
    bounds = data.block_bounds(n_rows, load_batch_size, cpus)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == n_rows
    assert (sizes >= 0).all() and sizes.max() - sizes.min() <= 1, "contiguous, near-equal blocks"
    assert 1 <= len(sizes) <= data.MAX_BLOCKS


@pytest.mark.parametrize(
    ("n_rows", "load_batch_size", "blocks"),
    [
        (100, 32, 1),  # fewer rows than 4 load batches: one block
        (500, 32, 3),  # room for 3 blocks of 4 load batches, not for 4
        (960, 32, 4),  # a small validation set still loads on 4 CPUs
        (6_144, 32, 4),  # a demo trial's pass: 4 blocks of 1,536 rows
        (12_848, 32, 8),  # ingest.py --quick: 8 blocks of about 1,600 rows, the measured optimum on 2 CPUs
        (200_000, 32, 64),  # a full pass: capped, 3,125 rows a block
    ],
)
@pytest.mark.parametrize("cpus", [1, 2])
def test_block_bounds_trade_task_overhead_for_parallelism(
    n_rows: int, load_batch_size: int, blocks: int, cpus: int
) -> None:
    sizes = np.diff(data.block_bounds(n_rows, load_batch_size, cpus))
    assert len(sizes) == blocks
    if n_rows >= data.MIN_BLOCKS * data.MIN_BLOCK_ROWS:
        assert sizes.min() >= data.MIN_BLOCK_ROWS, "a block long enough to repay its task's start-up"


@pytest.mark.parametrize(
    ("n_rows", "cpus", "blocks"), [(6_144, 16, 32), (2_000, 16, 15), (30_000, 16, 32), (50_000, 48, 64)]
)
def test_block_bounds_keep_every_cpu_of_a_big_node_busy(n_rows: int, cpus: int, blocks: int) -> None:
    """A small pass on a GPU node with many CPUs: two blocks per CPU (where the rows allow 4 load batches each),
    not the 4 long blocks a 2-CPU machine loads fastest."""
    assert len(data.block_bounds(n_rows, 32, cpus)) - 1 == blocks


# --------------------------------------------------------------------------------------------------
# load_batch and normalise


def _cached_batch(
    tmp_path: Path, n: int = 4, shape: tuple[int, int] = (40, 30), images: list[np.ndarray] | None = None
) -> tuple[dict, list[np.ndarray]]:
    """A batch of manifest rows (all CC views) whose pixels (random, or ``images``) live in a two-shard cache."""
    rng = np.random.default_rng(0)
    if images is None:
        images = [rng.integers(1000, 60000, size=shape, dtype=np.uint16) for _ in range(n)]
    columns: dict[str, list] = {k: [] for k in ("cache_file", "cache_offset", "cache_nbytes")}
    offsets = {0: 0, 1: 0}
    shards = {k: tmp_path / f"shard-{k:05d}.bin" for k in offsets}
    for i, image in enumerate(images):
        blob = cache.encode(image)
        shard = i % 2
        with open(shards[shard], "ab") as f:
            f.write(blob)
        columns["cache_file"].append(str(shards[shard]))
        columns["cache_offset"].append(offsets[shard])
        columns["cache_nbytes"].append(len(blob))
        offsets[shard] += len(blob)
    batch = {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "path": np.array([f"/nonexistent/img{i}.dcm" for i in range(n)], dtype=object),
        "label": np.array([i % 2 for i in range(n)], dtype=np.int64),
        "patient_id": np.array([f"p{i // 2}" for i in range(n)], dtype=object),
        "exam_id": np.array([f"e{i}" for i in range(n)], dtype=object),
        "laterality": np.array(["L", "R"] * (n // 2) + ["L"] * (n % 2), dtype=object),
        "view": np.array(["CC"] * n, dtype=object),
        "dataset": np.array(["EMBED"] * n, dtype=object),
        "cache_file": np.array(columns["cache_file"], dtype=object),
        "cache_offset": np.array(columns["cache_offset"], dtype=np.int64),
        "cache_nbytes": np.array(columns["cache_nbytes"], dtype=np.int64),
        "cache_height": np.full(n, shape[0], dtype=np.int64),
        "cache_width": np.full(n, shape[1], dtype=np.int64),
    }
    return batch, images


@pytest.mark.parametrize("n", [1, 4, 5])
def test_load_batch_shapes_and_metadata(tmp_path: Path, n: int) -> None:
    batch, images = _cached_batch(tmp_path, n)
    out = data.load_batch(batch, image_size=(40, 30), use_cache=True)
    assert out["image"].shape == (n, 1, 40, 30)
    assert out["image"].dtype == np.uint16, "batches travel as uint16; to_model_input normalises them"
    assert out["label"].dtype == np.float32
    assert out["label"].tolist() == [float(i % 2) for i in range(n)]
    assert "path" not in out, "paths stay out of the worker batches"
    for column in ("image_id", "patient_id", "exam_id", "laterality", "view", "dataset"):
        assert out[column].tolist() == batch[column].tolist()
    np.testing.assert_array_equal(out["image"][:, 0], np.stack(images))  # the cached values, unchanged


@pytest.mark.parametrize("size", [(20, 16), (64, 48), (40, 60), (16, 16)])
def test_load_batch_resizes_to_image_size(tmp_path: Path, size: tuple[int, int]) -> None:
    batch, images = _cached_batch(tmp_path, 3, (40, 30))
    out = data.load_batch(batch, image_size=size, use_cache=True)
    assert out["image"].shape == (3, 1, *size)
    # Resizing keeps the grey levels: the mean stays close to the cached image's.
    restored = out["image"][:, 0] / data.PIXEL_SCALE
    for got, image in zip(restored, images, strict=True):
        assert got.mean() == pytest.approx(image.mean() / data.PIXEL_SCALE, abs=0.02)


def test_load_batch_augment_changes_pixels_only_when_asked(tmp_path: Path) -> None:
    batch, _ = _cached_batch(tmp_path, 6)
    plain = data.load_batch(batch, image_size=(40, 30), use_cache=True, augment_images=False)
    again = data.load_batch(batch, image_size=(40, 30), use_cache=True, augment_images=False, seed=5)
    np.testing.assert_array_equal(plain["image"], again["image"])
    augmented = data.load_batch(batch, image_size=(40, 30), use_cache=True, augment_images=True, seed=1)
    changed = [not np.allclose(a, b) for a, b in zip(augmented["image"], plain["image"], strict=True)]
    assert any(changed), "augmentation left every image of the batch unchanged"
    assert augmented["image"].shape == plain["image"].shape
    assert augmented["label"].tolist() == plain["label"].tolist()
    repeat = data.load_batch(batch, image_size=(40, 30), use_cache=True, augment_images=True, seed=1)
    np.testing.assert_array_equal(augmented["image"], repeat["image"])
    assert augmented["image"].dtype == np.uint16


def test_load_batch_augment_seed_matters(tmp_path: Path) -> None:
    batch, _ = _cached_batch(tmp_path, 6)
    first = data.load_batch(batch, image_size=(40, 30), use_cache=True, augment_images=True, seed=1)
    second = data.load_batch(batch, image_size=(40, 30), use_cache=True, augment_images=True, seed=2)
    assert not np.array_equal(first["image"], second["image"])


def test_load_batch_draws_follow_the_row_position_not_the_batch(tmp_path: Path) -> None:
    """A row's augmentation depends on the seed, its image and its position in the pass (``draw``), not on the
    rows it shares a map batch with: Ray Data cuts a pass into blocks by its length and the cluster's CPUs."""
    batch, _ = _cached_batch(tmp_path, 6)
    batch[data.DRAW_COLUMN] = np.arange(100, 106)
    kwargs = dict(image_size=(40, 30), use_cache=True, augment_images=True, seed=3)
    whole = data.load_batch(batch, **kwargs)["image"]
    for cut in (1, 2, 5):
        parts = [{k: v[:cut] for k, v in batch.items()}, {k: v[cut:] for k, v in batch.items()}]
        split = np.concatenate([data.load_batch(part, **kwargs)["image"] for part in parts])
        np.testing.assert_array_equal(split, whole, err_msg=f"batch cut after row {cut}")
    assert data.DRAW_COLUMN not in data.load_batch(batch, **kwargs), "the position stays out of the worker batches"
    # The same image at another position (its next time round) gets another draw.
    later = dict(batch, **{data.DRAW_COLUMN: np.arange(106, 112)})
    redrawn = data.load_batch(later, **kwargs)["image"]
    assert sum(not np.array_equal(a, b) for a, b in zip(redrawn, whole, strict=True)) >= 4


@pytest.mark.parametrize(("views", "may_flip"), [("CC", True), ("MLO", False), ("U", False), (None, False)])
def test_load_batch_flips_only_views_where_a_flip_is_possible(
    tmp_path: Path, views: str | None, may_flip: bool
) -> None:
    """load_batch hands each row's view to the augmentation: an MLO flipped upside down puts the pectoral muscle
    at the bottom, which no real mammogram shows. A batch without a view column is not flipped."""
    n, shape = 40, (40, 30)
    image = np.full(shape, 8000, dtype=np.uint16)
    image[:, :15] = 30000  # the breast, chest wall on the left
    image[:10, :10] = 60000  # a bright wedge at the top of the chest wall, like the pectoral muscle
    batch, _ = _cached_batch(tmp_path, n, shape, images=[image] * n)
    if views is None:
        del batch["view"]
    else:
        batch["view"] = np.array([views] * n, dtype=object)
    out = data.load_batch(batch, image_size=shape, use_cache=True, augment_images=True, seed=4)["image"][:, 0]
    upside_down = out[:, 20:].mean(axis=(1, 2)) > out[:, :20].mean(axis=(1, 2))
    if may_flip:
        assert 0.25 * n <= upside_down.sum() <= 0.75 * n, f"{upside_down.sum()}/{n} CC images flipped"
    else:
        assert not upside_down.any(), f"{upside_down.sum()}/{n} images of view {views!r} flipped vertically"


def test_load_batch_row_order(tmp_path: Path) -> None:
    batch, images = _cached_batch(tmp_path, 4)
    order = np.array([3, 0, 2, 1])
    reordered = {k: v[order] for k, v in batch.items()}
    out = data.load_batch(reordered, image_size=(40, 30), use_cache=True)
    for got, i in zip(out["image"][:, 0], order, strict=True):
        np.testing.assert_array_equal(got, images[i])


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 16, 12), (2, 64, 48)])
def test_normalise_shape_and_values(shape: tuple[int, int, int]) -> None:
    images = np.random.default_rng(0).uniform(0, 1, size=shape).astype(np.float32)
    out = data.normalise(images)
    assert out.shape == (shape[0], 1, shape[1], shape[2])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], (images - data.MEAN) / data.STD, rtol=1e-6)


def test_normalise_mean_grey_is_zero() -> None:
    assert data.normalise(np.full((1, 2, 2), data.MEAN, dtype=np.float32)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("shape", "size"), [((40, 30), (40, 30)), ((40, 30), (20, 15)), ((1, 1), (16, 16))])
def test_resize_uint16(shape: tuple[int, int], size: tuple[int, int]) -> None:
    image = np.full(shape, 30000, dtype=np.uint16)
    out = data.resize_uint16(image, size)
    assert out.shape == size
    assert out.dtype == np.uint16
    assert (out == 30000).all()
