"""The registrar: keeps records in the store, all on one lease it owns.

Verbs say what happened. ``announce(key, record)`` puts the record (taking the
key over from any other holder: the newest healthy instance wins) and says
whether it wrote; ``refresh()`` keeps the lease alive, repairs what went
missing and says how; ``withdraw(key)`` deletes a record only while it still
sits on this registrar's own lease; ``remove_stale(key)`` removes a record left
on another lease, guarded on its revision; ``move`` changes a record's key in
one step; ``close()`` withdraws everything and revokes the lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from announcer.record import Record


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What a refresh found and did."""

    ttl: int | None  # what etcd reset the lease to; None: no lease yet, nothing to keep
    lease_lost: bool = False  # the lease was gone (expired, or etcd lost it)
    restored: tuple[str, ...] = ()  # keys put back: after a lost lease, or found missing


@dataclass(frozen=True, slots=True)
class Closed:
    """What closing did: the records deleted, and whether a lease was revoked."""

    withdrawn: tuple[str, ...] = ()
    revoked: bool = False


class Registrar(Protocol):
    @property
    def ttl(self) -> int | None:
        """The TTL etcd granted the current lease (None: no lease)."""

    def holds(self, key: str, now: float) -> bool:
        """True while etcd holds our record at ``key`` on a live lease, as far as we can know."""

    def holder(self, key: str) -> int | None:
        """The other lease seen holding ``key`` at the last look, if any."""

    async def announce(self, key: str, record: Record) -> bool: ...

    async def withdraw(self, key: str) -> bool: ...

    async def withdraw_all(self) -> tuple[str, ...]: ...

    async def move(self, old_key: str, new_key: str, record: Record) -> None: ...

    async def remove_stale(self, key: str) -> int | None: ...

    async def refresh(self) -> Refreshed: ...

    async def close(self) -> Closed: ...
