"""The registrar: keeps one record in the store, on one lease it owns.

Three verbs and a close. ``announce(record)`` puts the record (taking the key
over from any other holder: the newest healthy instance wins); ``refresh()``
keeps the lease alive and repairs what went missing; ``withdraw()`` deletes
the record only while it still sits on this registrar's own lease;
``close()`` withdraws and revokes the lease.
"""

from __future__ import annotations

from typing import Protocol

from announcer.record import Record


class Registrar(Protocol):
    lease_grants: int  # leases granted so far: a change means the old one was lost
    last_ttl: int | None  # the TTL etcd reported at the last keepalive

    async def announce(self, record: Record) -> None: ...

    async def refresh(self) -> None: ...

    async def withdraw(self) -> None: ...

    async def close(self) -> None: ...
