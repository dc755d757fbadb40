"""The etcd v3 registrar: one lease for the life of the agent, every record on it."""

from __future__ import annotations

import time
from typing import Any

import structlog

from announcer.record import Record
from announcer.registrar import Closed, Refreshed
from announcer.registrar.etcd_client import (
    EtcdClient,
    LeaseNotFound,
    Txn,
    compare_lease,
    compare_mod_revision,
    compare_value,
    op_delete,
    op_put,
)

log = structlog.get_logger("announcer.registrar")
TXN_BATCH = 64  # operations per transaction: etcd refuses more than --max-txn-ops (128 by default)


class EtcdRegistrar:
    """Owns one lease and, while announced, the records on it.

    Steady state costs one keepalive and one keys-only read per refresh: reads
    create no revision, so watchers of the prefix see nothing while nothing
    changes. No value written by anyone else is ever read: whether our record is
    already in place is a compare inside the transaction that would write it.
    """

    def __init__(self, client: EtcdClient, ttl: int, *, clock: Any = time.monotonic) -> None:
        self.client = client
        self.requested_ttl = ttl
        self.lease: int | None = None
        self._ttl: int | None = None  # what etcd granted (or reset the lease to) last time
        self._clock = clock
        self._lease_until = 0.0  # the lease surely lives until then (clock time)
        self._records: dict[str, bytes] = {}  # what we want in etcd, by key
        self._written: set[str] = set()  # keys known to hold our record on our lease
        self._displaced: dict[str, int] = {}  # keys another lease holds: the newest instance wins

    # -- what we know --------------------------------------------------------

    @property
    def ttl(self) -> int | None:
        return self._ttl if self.lease is not None else None

    def holds(self, key: str, now: float) -> bool:
        return key in self._written and key not in self._displaced and now < self._lease_until

    def holder(self, key: str) -> int | None:
        return self._displaced.get(key)

    # -- the verbs -----------------------------------------------------------

    async def announce(self, key: str, record: Record) -> bool:
        value = record.to_json().encode()
        self._records[key] = value
        lease = await self._ensure_lease()
        try:
            wrote = await self._put_unless_in_place(key, value, lease)
        except LeaseNotFound:
            self._forget_lease(lease)
            wrote = await self._put_unless_in_place(key, value, await self._ensure_lease())
        self._written.add(key)
        self._displaced.pop(key, None)
        return wrote

    async def withdraw(self, key: str) -> bool:
        deleted = False
        if self.lease is not None and key in self._records:
            deleted = await self.client.delete_if_lease(key, self.lease)
        # Only now: if the delete failed, the record is still ours to keep alive or put back
        # (the agent retries the withdraw, or the service recovered and wants it after all).
        self._records.pop(key, None)
        self._written.discard(key)
        self._displaced.pop(key, None)
        return deleted

    async def move(self, old_key: str, new_key: str, record: Record) -> None:
        """Put the record at ``new_key`` and delete ``old_key`` (if still ours), in one transaction."""
        value = record.to_json().encode()
        lease = await self._ensure_lease()
        put = op_put(new_key, value, lease)
        await self.client.txn("move", Txn([compare_lease(old_key, lease)], [put, op_delete(old_key)], [put]))
        for key in (old_key, new_key):
            self._records.pop(key, None)
            self._written.discard(key)
            self._displaced.pop(key, None)
        self._records[new_key] = value
        self._written.add(new_key)

    async def remove_stale(self, key: str) -> int | None:
        """Remove a record that another lease holds at ``key``; its lease ID when removed.

        Guarded on the record's mod_revision: one rewritten meanwhile (by a live agent)
        is left alone.
        """
        current = await self.client.get(key, keys_only=True)
        if current is None or (self.lease is not None and current.lease == self.lease):
            return None
        txn = Txn([compare_mod_revision(key, current.mod_revision)], [op_delete(key)])
        if not await self.client.txn("remove_stale", txn):
            return None
        self._displaced.pop(key, None)
        return current.lease

    async def refresh(self) -> Refreshed:
        if self.lease is None:
            if not self._records:
                return Refreshed(ttl=None)
            await self._ensure_lease()
            return Refreshed(self._ttl, lease_lost=True, restored=await self._put_all())
        lease = self.lease
        sent = self._clock()
        ttl = await self.client.keepalive(lease)
        if ttl <= 0:
            log.warning("lease lost", lease=lease)
            self._forget_lease(lease)
            if not self._records:
                return Refreshed(ttl=None, lease_lost=True)
            await self._ensure_lease()
            return Refreshed(self._ttl, lease_lost=True, restored=await self._put_all())
        self._ttl = ttl
        self._lease_until = sent + ttl
        return Refreshed(ttl, restored=await self._repair(lease))

    async def withdraw_all(self) -> tuple[str, ...]:
        """Withdraw every record, in as few requests as etcd's transaction size allows."""
        keys = list(self._records)
        deleted: list[str] = []
        if self.lease is not None:
            for start in range(0, len(keys), TXN_BATCH):
                deleted += await self.client.delete_many_if_lease(keys[start : start + TXN_BATCH], self.lease)
        for key in keys:
            self._records.pop(key, None)
            self._written.discard(key)
            self._displaced.pop(key, None)
        return tuple(deleted)

    async def close(self) -> Closed:
        """Withdraw every record and give the lease back; the caller bounds the time."""
        withdrawn = await self.withdraw_all()
        revoked = False
        if self.lease is not None:
            revoked = await self.client.revoke(self.lease)
            self._forget_lease(self.lease)
        return Closed(withdrawn, revoked)

    # -- the parts -----------------------------------------------------------

    async def _put_unless_in_place(self, key: str, value: bytes, lease: int) -> bool:
        """One transaction: if the key already holds exactly this value on this lease, nothing."""
        txn = Txn([compare_value(key, value), compare_lease(key, lease)], [], [op_put(key, value, lease)])
        return not await self.client.txn("put", txn)

    async def _put_all(self) -> tuple[str, ...]:
        assert self.lease is not None
        for key, value in self._records.items():
            await self.client.put(key, value, self.lease)
            self._written.add(key)
            self._displaced.pop(key, None)
        return tuple(self._records)

    async def _repair(self, lease: int) -> tuple[str, ...]:
        """Look at every wanted key in one read; put back the missing ones."""
        if not self._records:
            return ()
        keys = list(self._records)
        held = await self._holders(keys)
        restored: list[str] = []
        for key in keys:
            holder = held.get(key)
            if holder is None:
                log.warning("record missing, putting it back", key=key)
                await self.client.put(key, self._records[key], lease)
                self._written.add(key)
                self._displaced.pop(key, None)
                restored.append(key)
            elif holder == lease:
                self._written.add(key)
                self._displaced.pop(key, None)
            elif self._displaced.get(key) != holder:
                # Another instance took the key over: it is the newest, leave it be.
                self._displaced[key] = holder
                log.warning("key held by another lease, leaving it alone", key=key, other_lease=holder)
        return tuple(restored)

    async def _holders(self, keys: list[str]) -> dict[str, int]:
        """The lease holding each key that exists: one request per TXN_BATCH keys."""
        held: dict[str, int] = {}
        for start in range(0, len(keys), TXN_BATCH):
            batch = keys[start : start + TXN_BATCH]
            found = await self.client.get_many(batch, keys_only=True)
            held.update({key: kv.lease for key, kv in zip(batch, found, strict=True) if kv is not None})
        return held

    async def _ensure_lease(self) -> int:
        if self.lease is None:
            sent = self._clock()
            lease, granted = await self.client.grant(self.requested_ttl)
            self.lease, self._ttl = lease, granted
            self._lease_until = sent + granted
            log.info("lease granted", lease=lease, ttl=granted)
            if granted != self.requested_ttl:
                log.warning(
                    "etcd granted a different TTL than asked; keeping the lease by the granted one",
                    asked=self.requested_ttl, granted=granted, keepalive_every=round(granted / 3, 3),
                )  # fmt: skip
        return self.lease

    def _forget_lease(self, lease: int) -> None:
        if self.lease == lease:
            self.lease = None
            self._ttl = None
            self._lease_until = 0.0
            self._written.clear()
