"""The registrar: keeps a process's records in the store, all on one lease it owns.

It is told the whole wanted set, never a single step: ``sync(wanted)`` takes every
instance's (key, value) pairs at once and makes the store match, so a reload that
swaps two keys, or rotates three, is only puts (a key some instance still wants is
never deleted, whichever instance held it before). An instance's writes go in one
transaction (several instances share one, up to ``TXN_BATCH`` operations), and
each says what happened as a value (`Synced`). ``keepalive()`` keeps the lease
alive and is meant to run on its own schedule, whatever a long sync is doing;
``look()`` reads the wanted keys to find what went missing (before a watch opens, and
where the watch saw another client change one); ``remove_stale``
removes a crashed agent's record, guarded on its revision; ``withdraw_all`` and
``close`` end it. The store (etcd, or the tests' in-memory one) does the I/O.

Guards, for every key: a put takes the key over (the newest healthy instance wins)
unless it already holds exactly this value on our lease; a delete removes a key only
while it sits on our lease; a key another lease took over while its wanted value
stays the same is left alone (no tug of war with a successor).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

from announcer.errors import LeaseNotFound
from announcer.registrar.store import KeyValue, Store, WatchEvent, Write

__all__ = ["TXN_BATCH", "Closed", "Kept", "Registrar", "Store", "Synced", "WatchEvent", "Write"]

log = structlog.get_logger("announcer.registrar")
SWEEP_PAGE = 500  # records a sweep reads at once: well inside the client's bound on one answer
TXN_BATCH = 64  # operations per transaction: etcd refuses more than --max-txn-ops (128 by default)
Owner = TypeVar("Owner", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Synced:
    """What one sync did for one instance."""

    lease: int  # the lease its keys now sit on
    written: tuple[str, ...] = ()  # keys put (their value was not already in place)
    deleted: tuple[str, ...] = ()  # keys it gave up, deleted from our lease
    left: tuple[str, ...] = ()  # keys it gave up that were not on our lease (a successor's, or gone)


@dataclass(frozen=True, slots=True)
class Kept:
    """What a keepalive found."""

    ttl: int | None  # what the lease was reset to; None: no lease (none yet, or lost)
    lost: bool = False  # the lease was gone (expired, or etcd lost it)
    records: int = 0  # with ``lost``: how many of our records went with it


@dataclass(frozen=True, slots=True)
class Closed:
    """What closing did: the records deleted, and whether a lease was revoked."""

    withdrawn: tuple[str, ...] = ()
    revoked: bool = False


@dataclass
class _Batch(Generic[Owner]):
    steps: list[tuple[Owner, Write]] = field(default_factory=list)


class Registrar(Generic[Owner]):
    """Owns one lease and the books of what sits on it."""

    def __init__(self, store: Store, ttl: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.requested_ttl = ttl
        self.lease: int | None = None
        self.lease_changed = asyncio.Event()  # set at every grant and loss: the keepalive reschedules
        self._ttl: int | None = None  # what etcd granted (or reset the lease to) last time
        self._clock = clock
        self._confirmed = 0.0  # when the lease was last known alive (the send time of its answer)
        # The books. What the process wants, by key; what is known to sit on our lease; keys
        # written without an answer (they may sit there, or not); keys another lease
        # holds while we want them (its lease, and the value we wanted then).
        self._wanted: dict[str, bytes] = {}
        self._owner: dict[str, Owner] = {}
        self._placed: dict[str, bytes] = {}
        self._sent: set[str] = set()
        self._displaced: dict[str, tuple[int, bytes]] = {}
        # Keys a watch saw put on our lease that nobody wants: a put etcd carried out late
        # (a frozen or overloaded member, after the delete that followed it). No owner's.
        self._strays: set[str] = set()

    # -- what we know --------------------------------------------------------

    @property
    def ttl(self) -> int | None:
        """The TTL etcd granted the current lease (None: no lease)."""
        return self._ttl if self.lease is not None else None

    @property
    def renew_at(self) -> float | None:
        """When the next keepalive is due (clock time): a third of the TTL after the last answer."""
        if self.lease is None or self._ttl is None:
            return None
        return self._confirmed + self._ttl / 3

    def holds(self, key: str, now: float) -> bool:
        """True while our record sits at ``key`` on a live lease, as far as we can know."""
        return (
            key in self._placed
            and key not in self._displaced
            and self._ttl is not None
            and now < self._confirmed + self._ttl
        )

    @property
    def held(self) -> tuple[str, ...]:
        """Every key that may sit on our lease: placed, or written without an answer."""
        return tuple(dict.fromkeys([*self._placed, *self._sent]))

    def holder(self, key: str) -> int | None:
        """The other lease seen holding a key we want, if any."""
        displaced = self._displaced.get(key)
        return displaced[0] if displaced is not None else None

    # -- the verbs -----------------------------------------------------------

    async def sync(self, wanted: Mapping[Owner, Mapping[str, bytes]]) -> AsyncIterator[tuple[Owner, Synced]]:
        """Make the store hold exactly ``wanted`` (owner -> its pairs); yields each owner's outcome.

        Owners whose pairs are already in place are not yielded. An owner's outcome is
        yielded as soon as its transaction is answered, so an error later in the pass
        loses nothing already done.
        """
        self._wanted = {key: value for pairs in wanted.values() for key, value in pairs.items()}
        owners = {key: owner for owner, pairs in wanted.items() for key in pairs}
        await self._remove_strays()
        for key, (_, value) in list(self._displaced.items()):
            if key in self._wanted and self._wanted[key] != value:  # a new announcement takes it over
                del self._displaced[key]
        for _ in range(3):  # a lease lost midway: what went with it is put back in the next round
            batches = self._batches(owners)
            if not batches:
                return
            for batch in batches:
                lease, results = await self._write([write for _, write in batch.steps])
                done: dict[Owner, tuple[list[str], list[str], list[str]]] = {}
                for (owner, write), happened in zip(batch.steps, results, strict=True):
                    written, deleted, left = done.setdefault(owner, ([], [], []))
                    self._settle(owner, write)
                    if write.is_put:
                        if happened:
                            written.append(write.key)
                    else:
                        (deleted if happened else left).append(write.key)
                for owner, (written, deleted, left) in done.items():
                    yield owner, Synced(lease, tuple(written), tuple(deleted), tuple(left))

    async def keepalive(self) -> Kept:
        lease = self.lease
        if lease is None:
            return Kept(ttl=None)
        sent = self._clock()
        ttl = await self.store.keepalive(lease)
        if self.lease != lease:  # lost and regranted while we waited: that lease is kept anew
            return Kept(ttl=self.ttl)
        if ttl <= 0:
            return Kept(ttl=None, lost=True, records=self._lost(lease))
        self._ttl, self._confirmed = ttl, sent
        return Kept(ttl)

    def observe(self, events: Iterable[WatchEvent]) -> tuple[str, ...]:
        """The keys a watch saw change that need a look: a record of ours deleted, a key we
        want taken by another lease, a key nobody wants put on our lease (a late write, removed
        by the next sync). Our own writes need none; each key's newest event decides."""
        lease = self.lease
        suspects: list[str] = []
        newest = {event.kv.key.decode("utf-8", "replace"): event for event in events}
        for key, event in newest.items():
            if lease is None:
                break
            if key not in self._wanted:
                ours = event.kind == "PUT" and event.kv.lease == lease
                if ours and key not in self._placed and key not in self._sent:  # the books say gone
                    self._strays.add(key)
                    suspects.append(key)
                continue
            if event.kind == "DELETE":
                if key in self._placed or key in self._displaced:
                    suspects.append(key)
            elif event.kv.lease != lease and self.holder(key) != event.kv.lease:
                suspects.append(key)
        return tuple(dict.fromkeys(suspects))

    async def look(self, keys: Iterable[str] | None = None) -> tuple[int, tuple[str, ...]]:
        """Read ``keys`` (every wanted key by default; keys only, TXN_BATCH a request):
        (the first request's revision, the records of ours found missing).

        A record of ours found missing leaves the books, so the next sync puts it back;
        a key another lease took over is left alone while its wanted value stays. The
        revision is where a watch over the same keys starts without a gap: a change after
        any of the reads is at a later revision. 0 when nothing was read.
        """
        lease = self.lease
        keys = list(self._wanted if keys is None else keys)
        if lease is None or not keys:
            return 0, ()
        missing: list[str] = []
        first = 0
        for start in range(0, len(keys), TXN_BATCH):
            batch = keys[start : start + TXN_BATCH]
            revision, found = await self.store.read_keys(batch)
            first = first or revision
            if self.lease != lease:  # lost meanwhile: the next sync puts everything back
                return first, ()
            for key, kv in zip(batch, found, strict=True):
                if key not in self._wanted:
                    continue
                if kv is None:
                    if key in self._placed or key in self._displaced:
                        missing.append(key)
                elif kv.lease != lease and self.holder(key) != kv.lease:
                    # Another instance took the key over: it is the newest, leave it be.
                    self._displaced[key] = (kv.lease, self._wanted[key])
                    self._placed.pop(key, None)
                    log.warning("key held by another lease, leaving it alone", key=key, other_lease=kv.lease)
        if missing and await self.store.keepalive(lease) <= 0:
            self._lost(lease)  # not deleted one by one: the lease went, and all of them with it
            return first, tuple(missing)
        for key in missing:
            log.warning("record missing, putting it back", key=key)
            self._placed.pop(key, None)
            self._displaced.pop(key, None)
        return first, tuple(missing)

    async def remove_stale(self, key: str) -> int | None:
        """Remove a record that another lease holds at ``key``; its lease ID when removed.

        Guarded on the record's mod_revision: one rewritten meanwhile (by a live agent)
        is left alone.
        """
        current = await self.store.get(key, keys_only=True)
        if current is None or (self.lease is not None and current.lease == self.lease):
            return None
        if not await self.store.delete_if_revision(key, current.mod_revision):
            return None
        self._displaced.pop(key, None)
        return current.lease

    async def sweep(
        self, prefix: str, doomed: Callable[[KeyValue], list[str] | None]
    ) -> list[tuple[str, int]]:
        """Remove records another lease left under ``prefix`` that ``doomed`` names: (key, lease) each.

        ``doomed`` gets each record on another lease and names the keys to remove with it
        (the record's own first), or None. The record is removed guarded on its
        mod_revision, the others only while they sit on the same lease, each guarded on its
        own: nothing rewritten meanwhile, and nothing of a live agent, is ever deleted.
        """
        removed: list[tuple[str, int]] = []
        after: str | None = None
        while True:
            _, page, more = await self.store.list_prefix(prefix, SWEEP_PAGE, start=after)
            for kv in page:
                if kv.lease in (0, self.lease):
                    continue
                keys = doomed(kv)
                if not keys:
                    continue
                if await self.store.delete_if_revision(kv.key.decode("utf-8", "replace"), kv.mod_revision):
                    removed.append((kv.key.decode("utf-8", "replace"), kv.lease))
                for key in keys[1:]:
                    other = await self.store.get(key, keys_only=True)
                    if other is None or other.lease != kv.lease:
                        continue
                    if await self.store.delete_if_revision(key, other.mod_revision):
                        removed.append((key, kv.lease))
            if not more or not page:
                return removed
            after = page[-1].key.decode("utf-8", "replace") + "\0"

    async def withdraw_all(self) -> tuple[str, ...]:
        """Delete every record that may sit on our lease, TXN_BATCH a request; the keys deleted."""
        keys = list(self.held)
        deleted: list[str] = []
        lease = self.lease
        if lease is not None:
            for start in range(0, len(keys), TXN_BATCH):
                batch = keys[start : start + TXN_BATCH]
                try:
                    results = await self.store.write([Write(key, None) for key in batch], lease)
                except LeaseNotFound:  # the lease is gone, and every record on it
                    self._lost(lease)
                    break
                deleted += [key for key, happened in zip(batch, results, strict=True) if happened]
        self._wanted.clear()
        self._placed.clear()
        self._sent.clear()
        self._displaced.clear()
        self._owner.clear()
        return tuple(deleted)

    async def close(self) -> Closed:
        """Withdraw every record and give the lease back; the caller bounds the time."""
        withdrawn = await self.withdraw_all()
        revoked = False
        if self.lease is not None:
            lease = self.lease
            revoked = await self.store.revoke(lease)
            self._forget(lease)
        return Closed(withdrawn, revoked)

    # -- the parts -----------------------------------------------------------

    def _batches(self, owners: Mapping[str, Owner]) -> list[_Batch[Owner]]:
        """What differs from the books, an owner's writes kept together in one batch."""
        steps: dict[Owner, list[Write]] = {}
        for key, value in self._wanted.items():
            if self._placed.get(key) != value and key not in self._displaced:
                self._owner[key] = owners[key]  # before the put is sent: a lost answer still has an owner
                steps.setdefault(owners[key], []).append(Write(key, value))
        for key in dict.fromkeys([*self._placed, *self._sent, *self._displaced]):
            if key not in self._wanted:  # nobody wants it any more: delete it, if still ours
                steps.setdefault(self._owner[key], []).append(Write(key, None))
        batches: list[_Batch[Owner]] = []
        current: _Batch[Owner] = _Batch()
        for owner, writes in steps.items():
            if current.steps and len(current.steps) + len(writes) > TXN_BATCH:
                batches.append(current)
                current = _Batch()
            current.steps += [(owner, write) for write in writes]
        if current.steps:
            batches.append(current)
        return batches

    async def _write(self, writes: list[Write]) -> tuple[int, list[bool]]:
        lease = await self._ensure_lease()
        try:
            return lease, await self._send(writes, lease)
        except LeaseNotFound:
            self._lost(lease)
            lease = await self._ensure_lease()
            return lease, await self._send(writes, lease)

    async def _send(self, writes: list[Write], lease: int) -> list[bool]:
        self._sent.update(write.key for write in writes if write.is_put)
        try:
            return await self.store.write(writes, lease)
        except LeaseNotFound:
            raise  # an answer: nothing was written
        except BaseException:
            # No answer (a timeout, a hang-up, a cancel): each write may have landed or not,
            # so the books may not stay sure of any of these keys. The next sync puts what is
            # wanted (guarded: one already in place costs nothing) and deletes what is not.
            for write in writes:
                self._placed.pop(write.key, None)
                self._sent.add(write.key)
            raise

    def _settle(self, owner: Owner, write: Write) -> None:
        """The books after a write was answered: one place, for puts and deletes alike."""
        self._sent.discard(write.key)
        self._displaced.pop(write.key, None)
        if write.value is not None:
            self._placed[write.key] = write.value
            self._owner[write.key] = owner
        else:
            self._placed.pop(write.key, None)
            self._owner.pop(write.key, None)

    async def _ensure_lease(self) -> int:
        if self.lease is None:
            sent = self._clock()
            lease, granted = await self.store.grant(self.requested_ttl)
            self.lease, self._ttl, self._confirmed = lease, granted, sent
            self.lease_changed.set()
            log.info("lease granted", lease=lease, ttl=granted)
            if granted != self.requested_ttl:
                log.warning(
                    "etcd granted a different TTL than asked; keeping the lease by the granted one",
                    asked=self.requested_ttl, granted=granted, keepalive_every=round(granted / 3, 3),
                )  # fmt: skip
        return self.lease

    async def _remove_strays(self) -> None:
        """Delete the strays nobody wants again, each only while on our lease (guarded)."""
        self._strays.difference_update(self._wanted)
        lease, strays = self.lease, sorted(self._strays)
        if lease is None:
            self._strays.clear()  # no lease: nothing of ours is there
            return
        for start in range(0, len(strays), TXN_BATCH):
            batch = strays[start : start + TXN_BATCH]
            removed = await self.store.write([Write(key, None) for key in batch], lease)
            self._strays.difference_update(batch)
            for key in (key for key, gone in zip(batch, removed, strict=True) if gone):
                log.info("removed a late write of ours that nobody wants", key=key)

    def _lost(self, lease: int) -> int:
        """The lease is gone, and every record on it: said once, with how many went."""
        if self.lease != lease:
            return 0
        records = len(self._placed)
        log.warning("lease lost", lease=lease, records=records)
        self._forget(lease)
        return records

    def _forget(self, lease: int) -> None:
        if self.lease == lease:
            self.lease = None
            self._ttl = None
            self._placed.clear()
            self._sent.clear()
            self._strays.clear()
            self.lease_changed.set()
