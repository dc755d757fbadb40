"""An in-memory `Store` that keeps etcd's promises, for agent logic that needs no etcd.

It is no stand-in for etcd: everything that talks to etcd is tested on a real one,
and tests/test_registrar.py runs one sequence of verbs against this store and a real
etcd alike, so the two cannot drift. The registrar on top of it is the real one.

Leases really expire: a lease not kept alive within its TTL (by ``clock``, which a
test may pass) is gone with every key on it, as in etcd. ``fail`` queues errors for
the next calls; ``lose_answers`` queues errors the next writes raise after they landed
(etcd applied the transaction, its answer never came); ``latency`` makes every written
key cost that long, like a slow fsync.
Every change is kept with its revision, so a watch replays from any revision and then
follows; ``break_watches`` ends every open stream with an error, as a restart would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from announcer.errors import EtcdUnavailable, LeaseNotFound, WatchCompacted
from announcer.registrar import Registrar
from announcer.registrar.store import KeyValue, WatchEvent, Write


@dataclass
class Held:
    value: bytes
    lease: int
    mod_revision: int


class MemoryStore:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, latency: float = 0.0) -> None:
        self.clock = clock
        self.latency = latency
        self.data: dict[str, Held] = {}
        self.leases: dict[int, tuple[int, float]] = {}  # lease -> (ttl, expires at)
        self.revision = 1
        self.calls: list[str] = []
        self._next_lease = 100
        self._failures: list[Exception] = []
        self._lost_answers: list[Exception] = []
        self.history: list[tuple[int, WatchEvent]] = []
        self.compacted = 0  # watches from this revision or before fail with WatchCompacted
        self._streams: list[asyncio.Queue[list[WatchEvent] | Exception]] = []

    # -- test controls ----------------------------------------------------------

    def fail(self, *errors: Exception) -> None:
        """The next calls raise these, one each."""
        self._failures.extend(errors)

    def lose_answers(self, *errors: Exception) -> None:
        """The next writes land, then raise these, one each."""
        self._lost_answers.extend(errors)

    def expire(self, lease: int | None = None) -> None:
        """A lease runs out now (every lease, when none is named), and every key on it goes."""
        for each in [lease] if lease is not None else list(self.leases):
            self.leases.pop(each, None)
        gone = [k for k, v in self.data.items() if v.lease != 0 and v.lease not in self.leases]
        if gone:
            self.revision += 1
            self._changed([WatchEvent("DELETE", KeyValue(k.encode(), None, 0, self.revision)) for k in gone])
            for key in gone:
                del self.data[key]

    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        """Another client writes."""
        self.revision += 1
        self.data[key] = Held(value, lease, self.revision)
        self._changed([WatchEvent("PUT", KeyValue(key.encode(), value, lease, self.revision))])

    def delete(self, key: str) -> None:
        """Another client deletes."""
        if self.data.pop(key, None) is not None:
            self.revision += 1
            self._changed([WatchEvent("DELETE", KeyValue(key.encode(), None, 0, self.revision))])

    def break_watches(self, error: Exception | None = None) -> None:
        for stream in self._streams:
            stream.put_nowait(error or EtcdUnavailable("memory: the watch broke"))

    def _changed(self, events: list[WatchEvent]) -> None:
        self.history += [(self.revision, event) for event in events]
        for stream in self._streams:
            stream.put_nowait(events)

    def value(self, key: str) -> bytes | None:
        held = self.data.get(key)
        return held.value if held is not None else None

    # -- the Store protocol -------------------------------------------------------

    async def _call(self, verb: str) -> None:
        self.calls.append(verb)
        now = self.clock()
        self.expire_due(now)
        if self._failures:
            raise self._failures.pop(0)

    def expire_due(self, now: float) -> None:
        for lease, (_, until) in list(self.leases.items()):
            if until <= now:
                self.expire(lease)

    async def grant(self, ttl: int) -> tuple[int, int]:
        await self._call("grant")
        self._next_lease += 1
        self.leases[self._next_lease] = (ttl, self.clock() + ttl)
        return self._next_lease, ttl

    async def keepalive(self, lease: int) -> int:
        await self._call("keepalive")
        if lease not in self.leases:
            return 0
        ttl = self.leases[lease][0]
        self.leases[lease] = (ttl, self.clock() + ttl)
        return ttl

    async def revoke(self, lease: int) -> bool:
        await self._call("revoke")
        known = lease in self.leases
        self.expire(lease)
        return known

    async def write(self, writes: Sequence[Write], lease: int) -> list[bool]:
        await self._call("write")
        if any(w.is_put for w in writes) and lease not in self.leases:
            raise LeaseNotFound("requested lease not found", 5)
        if self.latency:
            await asyncio.sleep(self.latency * len(writes))  # a slow store, not a synchronisation
            self.expire_due(self.clock())
            if any(w.is_put for w in writes) and lease not in self.leases:
                raise LeaseNotFound("requested lease not found", 5)
        happened: list[bool] = []
        events: list[WatchEvent] = []
        revision = self.revision + 1  # one transaction, one revision
        for write in writes:
            held = self.data.get(write.key)
            if write.value is None:
                ours = held is not None and held.lease == lease
                if ours:
                    del self.data[write.key]
                    events.append(WatchEvent("DELETE", KeyValue(write.key.encode(), None, 0, revision)))
                happened.append(ours)
            else:
                in_place = held is not None and (held.value, held.lease) == (write.value, lease)
                if not in_place:
                    self.data[write.key] = Held(write.value, lease, revision)
                    events.append(
                        WatchEvent("PUT", KeyValue(write.key.encode(), write.value, lease, revision))
                    )
                happened.append(not in_place)
        if events:
            self.revision = revision
            self._changed(events)
        if self._lost_answers:
            raise self._lost_answers.pop(0)
        return happened

    async def read_keys(self, keys: Sequence[str]) -> tuple[int, list[KeyValue | None]]:
        await self._call("range")
        return self.revision, [self._kv(key, True) for key in keys]

    async def watch(self, keys: Sequence[str], start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        await self._call("watch")
        if start_revision <= self.compacted:
            raise WatchCompacted(f"memory: revision {start_revision} was compacted")
        wanted = {key.encode() for key in keys}
        stream: asyncio.Queue[list[WatchEvent] | Exception] = asyncio.Queue()
        replay = [event for revision, event in self.history if revision >= start_revision]
        if replay:
            stream.put_nowait(replay)
        self._streams.append(stream)
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Exception):
                    raise item
                events = [event for event in item if event.kv.key in wanted]
                if events:
                    yield events
        finally:
            self._streams.remove(stream)

    async def get(self, key: str, *, keys_only: bool = False) -> KeyValue | None:
        await self._call("range")
        return self._kv(key, keys_only)

    async def list_prefix(
        self, prefix: str, limit: int = 5000, *, start: str | None = None
    ) -> tuple[int, list[KeyValue], bool]:
        await self._call("range")
        keys = sorted(k for k in self.data if k.startswith(prefix) and (start is None or k >= start))
        found = [kv for kv in (self._kv(k, False) for k in keys[:limit]) if kv is not None]
        return self.revision, found, len(keys) > limit

    async def delete_if_revision(self, key: str, revision: int) -> bool:
        await self._call("remove_stale")
        held = self.data.get(key)
        if held is None or held.mod_revision != revision:
            return False
        self.delete(key)
        return True

    def _kv(self, key: str, keys_only: bool) -> KeyValue | None:
        held = self.data.get(key)
        if held is None:
            return None
        return KeyValue(key.encode(), None if keys_only else held.value, held.lease, held.mod_revision)


def memory_registrar(ttl: int = 3, **store: object) -> tuple[Registrar, MemoryStore]:  # type: ignore[type-arg]
    """The real registrar over an in-memory store."""
    memory = MemoryStore(**store)  # type: ignore[arg-type]
    return Registrar(memory, ttl, clock=memory.clock), memory
