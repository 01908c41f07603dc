"""A pace for Ray Data's scheduling loop while the consumer already has data waiting.

Ray Data 2.60's streaming executor runs its scheduling loop in a thread of the process that iterates the dataset
(here the Train worker). Each step waits in ``ray.wait`` on the running tasks, for at most 0.1 s. When the
consumer is slower than the pipeline, output backpressure stops the pipeline: no task runs, or the running tasks
hold outputs that the executor may not read yet. ``ray.wait`` then has nothing to wait on or returns at once, and
the loop spins, holding the GIL for much of each step. Measured on the 2-core CI-size machine (2026-12-06):
training the demo's space at 256×208 (``model.norm: batch``, ``model.stem: deep``, ``model.pool: max``,
24 epochs of 768 images in one stream), py-spy found the executor thread busy in 744 of 750 samples. The worker
trained at 7.5-7.8 images/s, against 17.4 for the same model on a stream short enough for the executor to finish
early. With this pace the long run trained at 16.8 images/s (15.8-17.2 over epochs 6-24); a 10 ms pace gave
14.1-15.2.

:class:`SchedulerPace` is a Ray Data execution callback. While the consumer has output waiting, it makes each
step of the loop last at least :attr:`SchedulerPace.min_step_s`. While the consumer waits for data, it does not
slow the loop at all. :func:`paced` adds it to a dataset's own :class:`~ray.data.DataContext`. The class travels
with the dataset to the process that runs its executor, by reference to this module.
"""

from __future__ import annotations

import time

import ray.data

try:  # an internal module of Ray Data (2.60); a Ray that moves it gets no pace rather than a broken pipeline
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # pragma: no cover - depends on the installed Ray
    ExecutionCallback = None


class SchedulerPace(ExecutionCallback or object):
    """Sleeps at the end of a scheduling step that came sooner than ``min_step_s`` after the previous one,
    unless the consumer is waiting for data.

    At 25 ms the loop runs at most 40 steps a second while output is queued. Each step still handles every
    finished task and starts every task the budget allows, and the consumer has a queue to read meanwhile.
    """

    min_step_s = 0.025

    def __init__(self) -> None:
        self._last: float | None = None
        self.paced_steps = 0

    def before_execution_starts(self, executor) -> None:
        self._last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        if self._last is not None and not consumer_idling(executor):
            wait = self._last + self.min_step_s - now
            if wait > 0:
                time.sleep(wait)
                self.paced_steps += 1
                now = time.perf_counter()
        self._last = now

    def after_execution_succeeds(self, executor) -> None:
        pass

    def after_execution_fails(self, executor, error: Exception) -> None:
        pass


def consumer_idling(executor) -> bool:
    """Whether the dataset's consumer is waiting on the executor (its output queue is empty).

    This reads the executor's own ``_consumer_idling``, as Ray's liveness rule does. If a Ray version lacks it,
    the answer is True, so the pace never delays a consumer: the callback then does nothing.
    """
    idling = getattr(executor, "_consumer_idling", None)
    if not callable(idling):
        return True
    try:
        return bool(idling())
    except Exception:  # noqa: BLE001 - a changed internal must not break a data pipeline
        return True


def paced(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """``dataset`` with :class:`SchedulerPace` among its context's execution callbacks (once); unchanged where
    the installed Ray has no execution callbacks."""
    if ExecutionCallback is None:
        return dataset
    context = dataset.context
    classes = list(context.custom_execution_callback_classes)
    if SchedulerPace not in classes:
        # A new list: the context is a shallow copy, and the list may be shared with DataContext.get_current().
        context.custom_execution_callback_classes = [*classes, SchedulerPace]
    return dataset
