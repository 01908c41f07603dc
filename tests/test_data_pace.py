"""The pace of Ray Data's scheduling loop: when it sleeps, when it must not, and that Ray runs it for our datasets."""

from __future__ import annotations

import pandas as pd
import pytest

from mammo_ray import data_pace
from mammo_ray.data_pace import SchedulerPace


class _Clock:
    """perf_counter and sleep on a fake clock, recording every sleep."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _Executor:
    def __init__(self, idling: bool) -> None:
        self.idling = idling

    def _consumer_idling(self) -> bool:
        return self.idling


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(data_pace.time, "perf_counter", fake.perf_counter)
    monkeypatch.setattr(data_pace.time, "sleep", fake.sleep)
    return fake


def test_a_fast_step_with_output_queued_is_stretched_to_the_minimum(clock: _Clock) -> None:
    pace, executor = SchedulerPace(), _Executor(idling=False)
    pace.before_execution_starts(executor)
    clock.now += 0.004  # the step itself took 4 ms
    pace.on_execution_step(executor)
    assert clock.sleeps == [pytest.approx(SchedulerPace.min_step_s - 0.004)]
    clock.now += 0.001
    pace.on_execution_step(executor)  # measured from the end of the previous pause, not from the start
    assert clock.sleeps[-1] == pytest.approx(SchedulerPace.min_step_s - 0.001)
    assert pace.paced_steps == 2


def test_a_slow_step_is_not_delayed(clock: _Clock) -> None:
    pace, executor = SchedulerPace(), _Executor(idling=False)
    pace.before_execution_starts(executor)
    clock.now += 0.1  # a step that waited in ray.wait for running tasks
    pace.on_execution_step(executor)
    assert clock.sleeps == []
    assert pace.paced_steps == 0


def test_a_waiting_consumer_is_never_delayed(clock: _Clock) -> None:
    pace, executor = SchedulerPace(), _Executor(idling=True)
    pace.before_execution_starts(executor)
    for _ in range(5):
        clock.now += 0.001
        pace.on_execution_step(executor)
    assert clock.sleeps == []


def test_without_the_executor_internal_the_pace_does_nothing(clock: _Clock) -> None:
    """A Ray version without ``_consumer_idling`` (or one where it raises) gets no pace rather than a stalled consumer."""

    class Broken:
        def _consumer_idling(self) -> bool:
            raise RuntimeError("changed internals")

    pace = SchedulerPace()
    for executor in (object(), Broken()):
        pace.before_execution_starts(executor)
        clock.now += 0.001
        pace.on_execution_step(executor)
    assert clock.sleeps == []


def test_paced_adds_the_callback_once_and_leaves_the_global_context_alone(ray_session) -> None:
    import ray.data

    before = list(ray.data.DataContext.get_current().custom_execution_callback_classes)
    dataset = ray.data.from_pandas(pd.DataFrame({"x": range(4)}))
    assert data_pace.paced(data_pace.paced(dataset)) is dataset
    assert dataset.context.custom_execution_callback_classes.count(SchedulerPace) == 1
    assert ray.data.DataContext.get_current().custom_execution_callback_classes == before


def test_ray_runs_the_dataset_s_own_callbacks(ray_session, prepared_data, monkeypatch: pytest.MonkeyPatch) -> None:
    """make_dataset's datasets carry the pace, and Ray's executor calls it for them."""
    from mammo_ray import data, manifest

    frame = manifest.load_manifests({"train": prepared_data["train"]})["train"]
    dataset = data.make_dataset(frame, image_size=(64, 48), use_cache=True, shuffle_seed=0, load_batch_size=8)
    assert SchedulerPace in dataset.context.custom_execution_callback_classes

    # Count the calls in this process, where iter_batches runs the executor. (Ray's map tasks unpickle the
    # dataset's context, so a callback class must be importable there: a class defined in this test is not.)
    calls = {"starts": 0, "steps": 0}
    start, step = SchedulerPace.before_execution_starts, SchedulerPace.on_execution_step

    def counted_start(self, executor):
        calls["starts"] += 1
        start(self, executor)

    def counted_step(self, executor):
        calls["steps"] += 1
        step(self, executor)

    monkeypatch.setattr(SchedulerPace, "before_execution_starts", counted_start)
    monkeypatch.setattr(SchedulerPace, "on_execution_step", counted_step)
    rows = sum(len(batch["label"]) for batch in dataset.iter_batches(batch_size=16, batch_format="numpy"))
    assert rows == len(frame)
    assert calls["starts"] == 1
    assert calls["steps"] >= 1
