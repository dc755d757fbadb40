"""What the registrar needs from a key-value store with leases, and nothing more.

The etcd client (`announcer.registrar.etcd_client.EtcdClient`) is the store announcer
runs on; the tests' in-memory store keeps the same promises, and one contract test
runs the same sequence against both. Everything above this line (what to write,
what to delete, what to put back) is the registrar's, written once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KeyValue:
    """What a range read says about a key; ``value`` is None when only keys were asked for."""

    key: bytes
    value: bytes | None
    lease: int
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change a watch saw: a put (with the new value) or a delete."""

    kind: str  # "PUT" or "DELETE"
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class Write:
    """One guarded operation of a write.

    A put (``value`` given) is skipped when the key already holds exactly this value on
    the lease, and otherwise takes the key over. A delete (``value`` None) removes the
    key only while it sits on the lease: a successor's record is never deleted.
    """

    key: str
    value: bytes | None

    @property
    def is_put(self) -> bool:
        return self.value is not None


class Store(Protocol):
    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its ID and the TTL granted (which may differ from ``ttl``)."""

    async def keepalive(self, lease: int) -> int:
        """The TTL the lease was reset to; 0 or less means the lease is gone."""

    async def revoke(self, lease: int) -> bool:
        """True when the lease existed and is now revoked."""

    async def write(self, writes: Sequence[Write], lease: int) -> list[bool]:
        """All ``writes`` in one transaction (one revision), each with its own guard.

        For each write, in order: a put says whether it wrote, a delete whether it
        deleted. Raises LeaseNotFound when the lease is gone.
        """

    async def get(self, key: str, *, keys_only: bool = False) -> KeyValue | None: ...

    async def read_keys(self, keys: Sequence[str]) -> tuple[int, list[KeyValue | None]]:
        """Several keys (without their values) read at one revision: (that revision, what was found)."""

    def watch(self, keys: Sequence[str], start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Every change to ``keys`` from ``start_revision`` on, as it comes, one batch at a time.

        Never ends on its own: it raises when the stream breaks (EtcdUnavailable, and
        WatchCompacted when ``start_revision`` is gone), and the caller reads, then watches again.
        """

    async def list_prefix(
        self, prefix: str, limit: int = ..., *, start: str | None = None
    ) -> tuple[int, list[KeyValue], bool]:
        """Keys under ``prefix`` (from ``start`` on), with values, sorted: (revision, found, more left)."""

    async def delete_if_revision(self, key: str, revision: int) -> bool:
        """Delete ``key`` only while its mod_revision is ``revision``; True when deleted."""
