"""The sweep's trial slots: the concurrency limit that restored trials meet too (mammo_ray.trial_slots)."""

from __future__ import annotations

import threading
import time

import pytest

from mammo_ray import trial_slots


def test_slots_admit_up_to_the_limit_and_a_release_frees_one():
    slots = trial_slots.TrialSlots(2)
    assert slots.try_acquire("a") and slots.try_acquire("b")
    assert not slots.try_acquire("c")
    assert slots.try_acquire("a")  # a holder asking again keeps its slot
    slots.release("a")
    slots.release("a")  # idempotent
    assert slots.try_acquire("c")
    assert slots.holders() == ["b", "c"]


def test_a_lease_that_is_not_renewed_expires_and_its_slot_goes_to_another_trial():
    slots = trial_slots.TrialSlots(1, lease_s=0.2)
    assert slots.try_acquire("dead")
    assert not slots.try_acquire("next")
    time.sleep(0.3)
    assert slots.try_acquire("next")
    assert not slots.renew("dead")  # its holder learns that it lost the slot
    assert slots.renew("next")


def test_slots_refuse_a_limit_below_one():
    with pytest.raises(ValueError, match="at least 1"):
        trial_slots.TrialSlots(0)


def test_trials_wait_for_a_slot_on_the_actor_and_get_it_when_the_holder_releases(ray_session):
    actor = trial_slots.start(1)
    first = trial_slots.Slot(actor, "first", renew_s=0.1, poll_s=0.05)
    second = trial_slots.Slot(actor, "second", renew_s=0.1, poll_s=0.05)
    assert first.acquire() < 5.0
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    assert not got.wait(1.0)  # the limit holds while "first" renews its lease
    first.release()
    assert got.wait(10.0)
    waiter.join()
    import ray

    assert ray.get(actor.holders.remote()) == ["second"]
    second.release()
    assert ray.get(actor.holders.remote()) == []


def test_a_release_ends_a_wait_without_taking_the_slot(ray_session):
    """Tune stopping a waiting trial (its cleanup releases) must not leave the trial holding a slot afterwards."""
    import ray

    actor = trial_slots.start(1)
    holder = trial_slots.Slot(actor, "holder", poll_s=0.05)
    holder.acquire()
    waiting = trial_slots.Slot(actor, "waiting", poll_s=0.05)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (waiting.acquire(), done.set()))
    thread.start()
    time.sleep(0.3)
    waiting.release()
    assert done.wait(10.0) and waiting.released
    thread.join()
    assert ray.get(actor.holders.remote()) == ["holder"]
    holder.release()
