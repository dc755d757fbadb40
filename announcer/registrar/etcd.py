"""The etcd v3 registrar: one lease for the life of the agent."""

from __future__ import annotations

import structlog

from announcer.record import Record
from announcer.registrar.etcd_client import EtcdClient, LeaseNotFound

log = structlog.get_logger("announcer.registrar")


class EtcdRegistrar:
    """Owns one lease and, while announced, the record on it.

    Steady state costs one keepalive and one read per refresh: reads create no
    revision, so watchers of the prefix see nothing while nothing changes.
    """

    def __init__(self, client: EtcdClient, key: str, ttl: int) -> None:
        self.client = client
        self.key = key
        self.ttl = ttl
        self.lease: int | None = None
        self.lease_grants = 0
        self.last_ttl: int | None = None  # what etcd reset the lease to last time
        self._record: Record | None = None  # what we want in etcd; None: nothing
        self._displaced_by: int | None = None  # the foreign lease we last logged

    async def announce(self, record: Record) -> None:
        self._record = record
        self._displaced_by = None
        lease = await self._ensure_lease()
        current = await self.client.get(self.key)
        if current is not None and current.lease == lease and current.value == record.to_json():
            return  # already true: a put would only wake every watcher
        await self._put(record)

    async def refresh(self) -> None:
        if self.lease is None:
            if self._record is not None:
                await self._put(self._record)
            return
        ttl = await self.client.keepalive(self.lease)
        self.last_ttl = ttl
        if ttl <= 0:
            log.warning("lease lost", lease=self.lease, key=self.key)
            self.lease = None
            if self._record is not None:
                await self._put(self._record)
            else:
                await self._ensure_lease()
            return
        if self._record is not None:
            await self._repair(self._record, self.lease)

    async def withdraw(self) -> None:
        if self.lease is not None:
            await self.client.delete_if_lease(self.key, self.lease)
        # Only now: if the delete failed, the record is still ours to keep alive or put back
        # (the agent retries the withdraw, or the service recovered and wants it after all).
        self._record = None

    async def close(self) -> None:
        """Withdraw and give the lease back; the caller bounds the time."""
        await self.withdraw()
        if self.lease is not None:
            await self.client.revoke(self.lease)
            self.lease = None

    async def _repair(self, record: Record, lease: int) -> None:
        current = await self.client.get(self.key)
        if current is None:
            log.warning("record missing, putting it back", key=self.key)
            await self._put(record)
        elif current.lease not in (lease, self._displaced_by):
            # Another instance took the key over: it is the newest, leave it be.
            self._displaced_by = current.lease
            log.warning(
                "key held by another lease, leaving it alone", key=self.key, other_lease=current.lease
            )

    async def _ensure_lease(self) -> int:
        if self.lease is None:
            self.lease = await self.client.grant(self.ttl)
            self.lease_grants += 1
            self.last_ttl = self.ttl
            log.info("lease granted", lease=self.lease, ttl=self.ttl)
        return self.lease

    async def _put(self, record: Record) -> None:
        lease = await self._ensure_lease()
        try:
            await self.client.put(self.key, record.to_json(), lease)
        except LeaseNotFound:
            log.warning("lease lost", lease=lease, key=self.key)
            self.lease = None
            await self.client.put(self.key, record.to_json(), await self._ensure_lease())
