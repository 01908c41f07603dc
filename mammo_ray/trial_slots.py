"""The sweep's concurrency limit, held by the trials themselves: at most N trials fit their Train run at once.

The searcher's concurrency limiter (``tune.make_searcher``) only holds back *new* suggestions. ``tune --resume``
gives every restored trial (interrupted, pending, and errored ones under ``resume_errored``) an actor at once, so
two errored demo trials resumed side by side reserved 1.2 of 2 CPUs, Ray Data got no whole CPU and the sweep hung.
So each trial also takes a slot from a small actor that the driver starts with the limit of this run
(``resources.max_concurrent_trials`` after ``tune.fit_concurrency``), and waits for one before it builds its data
and Train run. A slot is a lease that the holder renews every :data:`RENEW_S` seconds: a trial whose actor dies
without releasing it (its node lost) frees it after :data:`LEASE_S` seconds.

Like ``stop_flag``, this module imports nothing heavy: Ray's actor process imports the module that defines the
actor class.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

LEASE_S = 60.0
RENEW_S = 5.0
POLL_S = 1.0


class TrialSlots:
    """The actor: ``slots`` leases, each held by one trial id until released or expired."""

    def __init__(self, slots: int, lease_s: float = LEASE_S) -> None:
        if slots < 1:
            raise ValueError(f"trial slots must be at least 1, got {slots}")
        self._slots = slots
        self._lease_s = lease_s
        self._expiry: dict[str, float] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        self._expiry = {trial: until for trial, until in self._expiry.items() if until > now}

    def try_acquire(self, trial_id: str) -> bool:
        """Take (or keep) a slot for ``trial_id`` if one is free; False while all are held by others."""
        self._expire()
        if trial_id not in self._expiry and len(self._expiry) >= self._slots:
            return False
        self._expiry[trial_id] = time.monotonic() + self._lease_s
        return True

    def renew(self, trial_id: str) -> bool:
        """Extend ``trial_id``'s lease; False if it had lapsed (the slot may have gone to another trial)."""
        self._expire()
        if trial_id not in self._expiry:
            return False
        self._expiry[trial_id] = time.monotonic() + self._lease_s
        return True

    def release(self, trial_id: str) -> None:
        self._expiry.pop(trial_id, None)

    def holders(self) -> list[str]:
        self._expire()
        return sorted(self._expiry)


def start(slots: int):
    """The driver's slots actor, on the driver's node (a head node is never scaled away), holding no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(num_cpus=0)(TrialSlots)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
        .remote(slots)
    )


class Slot:
    """A trial's side: :meth:`acquire` waits for a slot and keeps its lease renewed until :meth:`release`."""

    def __init__(self, actor, trial_id: str, renew_s: float = RENEW_S, poll_s: float = POLL_S) -> None:
        self._actor = actor
        self._trial_id = trial_id
        self._renew_s = renew_s
        self._poll_s = poll_s
        self._released = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> float:
        """Wait until the trial holds a slot; returns the seconds waited.

        If the actor is gone (the driver that owned it ended), the trial goes on without a slot: Tune is ending it.
        """
        import ray

        started = time.monotonic()
        announced = False
        while not self._released.is_set():
            try:
                granted = ray.get(self._actor.try_acquire.remote(self._trial_id))
            except ray.exceptions.RayActorError:
                break
            if granted and self._released.is_set():  # released while asking: give back what was just granted
                with contextlib.suppress(ray.exceptions.RayActorError):
                    ray.get(self._actor.release.remote(self._trial_id))
                break
            if granted:
                self._renewer = threading.Thread(target=self._renew, name="trial-slot-lease", daemon=True)
                self._renewer.start()
                break
            if not announced:
                print(f"trial {self._trial_id}: waiting for one of the sweep's trial slots", file=sys.stderr)
                announced = True
            self._released.wait(self._poll_s)
        return time.monotonic() - started

    def _renew(self) -> None:
        import ray

        while not self._released.wait(self._renew_s):
            try:
                if not ray.get(self._actor.renew.remote(self._trial_id)):
                    print(f"warning: trial {self._trial_id}: its trial slot's lease had lapsed", file=sys.stderr)
            except ray.exceptions.RayActorError:
                return

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """Give the slot back (idempotent); also ends a wait in :meth:`acquire`."""
        import ray

        if self._released.is_set():
            return
        self._released.set()
        # If the actor is gone or slow, the lease expires on its own.
        with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            ray.get(self._actor.release.remote(self._trial_id), timeout=10)
