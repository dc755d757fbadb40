"""An in-memory Registrar that keeps the protocol's promises, for agent logic that needs no etcd.

It is no stand-in for etcd: everything that talks to etcd is tested on a real one.
It holds records on one lease in a dict, refuses or fails on demand (the next
calls raise what `fail` queued), and can lose its lease as an expired one would.
"""

from __future__ import annotations

from announcer.record import Record
from announcer.registrar import Closed, Refreshed


class MemoryRegistrar:
    def __init__(self, ttl: int = 3) -> None:
        self.requested_ttl = ttl
        self.lease: int | None = None
        self.store: dict[str, tuple[bytes, int]] = {}  # key -> (value, lease): "etcd"
        self._records: dict[str, bytes] = {}
        self._next_lease = 100
        self._failures: list[Exception] = []
        self.calls: list[str] = []

    # -- test controls ----------------------------------------------------------

    def fail(self, *errors: Exception) -> None:
        """The next calls raise these, one each."""
        self._failures.extend(errors)

    def expire(self) -> None:
        """The lease runs out: it and every record on it are gone."""
        self.store = {k: v for k, v in self.store.items() if v[1] != self.lease}
        self.lease = -1  # known to us, unknown to "etcd"

    # -- the protocol -----------------------------------------------------------

    @property
    def ttl(self) -> int | None:
        return self.requested_ttl if self.lease is not None else None

    def holds(self, key: str, now: float) -> bool:
        held = self.store.get(key)
        return held is not None and held[1] == self.lease and key in self._records

    def holder(self, key: str) -> int | None:
        held = self.store.get(key)
        return held[1] if held is not None and held[1] != self.lease else None

    def _call(self, verb: str) -> None:
        self.calls.append(verb)
        if self._failures:
            raise self._failures.pop(0)

    def _grant(self) -> int:
        if self.lease is None or self.lease == -1:
            self._next_lease += 1
            self.lease = self._next_lease
        return self.lease

    async def announce(self, key: str, record: Record) -> bool:
        self._call("announce")
        value = record.to_json().encode()
        self._records[key] = value
        lease = self._grant()
        wrote = self.store.get(key) != (value, lease)
        self.store[key] = (value, lease)
        return wrote

    async def withdraw(self, key: str) -> bool:
        self._call("withdraw")
        deleted = self.store.get(key, (b"", None))[1] == self.lease
        if deleted:
            del self.store[key]
        self._records.pop(key, None)
        return deleted

    async def withdraw_all(self) -> tuple[str, ...]:
        self._call("withdraw_all")
        deleted = tuple(k for k in self._records if self.store.get(k, (b"", None))[1] == self.lease)
        for key in deleted:
            del self.store[key]
        self._records.clear()
        return deleted

    async def move(self, old_key: str, new_key: str, record: Record) -> None:
        self._call("move")
        lease = self._grant()
        if self.store.get(old_key, (b"", None))[1] == lease:
            del self.store[old_key]
        self._records.pop(old_key, None)
        self._records[new_key] = record.to_json().encode()
        self.store[new_key] = (self._records[new_key], lease)

    async def remove_stale(self, key: str) -> int | None:
        self._call("remove_stale")
        held = self.store.get(key)
        if held is None or held[1] == self.lease:
            return None
        del self.store[key]
        return held[1]

    async def refresh(self) -> Refreshed:
        self._call("refresh")
        if self.lease == -1:  # expired: grant anew and put every record back
            self._grant()
            for key, value in self._records.items():
                self.store[key] = (value, self.lease)  # type: ignore[assignment]
            return Refreshed(self.ttl, lease_lost=True, restored=tuple(self._records))
        return Refreshed(self.ttl)

    async def close(self) -> Closed:
        self._call("close")
        withdrawn = await self.withdraw_all()
        revoked, self.lease = self.lease is not None, None
        return Closed(withdrawn, revoked)
