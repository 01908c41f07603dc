"""The actor behind ``train.RunStopper``: a flag that a trial sets and its Train run's rank 0 waits on.

It lives in a module of its own because Ray's actor process imports the module that defines the class: defined in
``train``, every trial's flag actor imported torch and albumentations first (about 2.4 s of CPU on the 2-core
machine, per trial), to hold one ``asyncio.Event``.
"""

from __future__ import annotations

import asyncio


class StopFlag:
    """A tiny async actor: ``wait`` resolves once ``set`` has been called."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> bool:
        await self._event.wait()
        return True
