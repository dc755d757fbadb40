"""One watch over every key the process may write: another client's change is seen at once.

The sync loop owns every look at etcd; the watch only listens. The sync loop reads the
keys first (``Registrar.look``) and opens the watch from that read's revision + 1, so
nothing that happens between the read and the watch is missed. What the stream brings is
sorted by the registrar (``observe``): our own writes and keys nobody wants need nothing;
a record of ours deleted, or a key another lease took, becomes a suspect, and the sync
loop is woken to look at the suspects and put back what went missing. A steady state
sends etcd nothing: no periodic reads, only the keepalive.

A stream that breaks (etcd restarted, its member killed, a failover, a compaction, an
endpoint that misbehaves) is opened again after a backoff, capped at TTL/3, by the same
read-then-watch; where a watch cannot work at all, that retry is today's periodic read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

import structlog

from announcer.backoff import Backoff
from announcer.errors import WatchCompacted
from announcer.registrar.store import Store, WatchEvent

log = structlog.get_logger("announcer")
Target = tuple[int, tuple[str, ...]]  # (the lease, the keys) a stream was opened for


class KeyWatch:
    def __init__(
        self,
        store: Store,
        observe: Callable[[Iterable[WatchEvent]], tuple[str, ...]],
        wake: asyncio.Event,
        backoff: Backoff,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._observe = observe
        self._wake = wake
        self._backoff = backoff
        self._clock = clock
        self._target: Target | None = None
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0  # a broken stream is opened again no sooner than this
        self._said: str | None = None
        self.suspects: set[str] = set()
        self.opened = 0  # streams opened (the tests follow the watch by it)

    @property
    def open(self) -> bool:
        return self._task is not None and not self._task.done()

    def due(self, lease: int, keys: tuple[str, ...]) -> bool:
        """True when a read, then a new stream, is wanted: none yet, another lease or set of
        keys, or the last stream broke and its backoff has passed."""
        if self.open and self._target == (lease, keys):
            return False
        return self._clock() >= self._retry_at or self._target != (lease, keys)

    def retry_in(self) -> float | None:
        """Seconds until a broken stream may be opened again; None while none is waiting."""
        if self.open or self._target is None:
            return None
        return max(0.0, self._retry_at - self._clock())

    def start(self, lease: int, keys: tuple[str, ...], revision: int) -> None:
        """Watch ``keys`` from ``revision`` + 1, ``revision`` being the read just made."""
        self.stop()
        self._target = (lease, keys)
        self.opened += 1
        self._task = asyncio.get_running_loop().create_task(self._stream(keys, revision + 1))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._target = None

    async def aclose(self) -> None:
        task = self._task
        self.stop()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def take_suspects(self) -> tuple[str, ...]:
        suspects = tuple(self.suspects)
        self.suspects.clear()
        return suspects

    async def _stream(self, keys: tuple[str, ...], start: int) -> None:
        try:
            async for events in self._store.watch(keys, start):
                self._backoff.reset()
                self._said = None
                suspects = self._observe(events)
                if suspects:
                    self.suspects.update(suspects)
                    self._wake.set()
        except WatchCompacted as exc:  # read again at once: the sync loop starts from there
            log.info("the watch's revision was compacted; reading again", error=str(exc))
            self._retry_at = self._clock()
        except Exception as exc:  # noqa: BLE001 - any fault of the stream: reopened, never fatal
            delay = self._backoff.next_delay()
            self._retry_at = self._clock() + delay
            message = str(exc) or type(exc).__name__
            if message != self._said:  # once per distinct cause, not once per retry
                self._said = message
                log.info(
                    "the watch broke; reading, then watching again", error=message, retry_in=round(delay, 2)
                )
        self._wake.set()  # the sync loop reads, then opens the watch again (after retry_in)
