"""The etcd client and registrar against real etcd 3.5 and 3.4."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from announcer.record import Record
from announcer.registrar.etcd import EtcdRegistrar
from announcer.registrar.etcd_client import EtcdClient, EtcdSettings, EtcdUnavailable, LeaseNotFound
from tests.servers import EtcdServer, Watcher, free_port

KEY = "/services/web/127.0.0.1:5555"
RECORD = Record("node-1", "127.0.0.1", 5555, {"zone": "a"})


@pytest.fixture
async def client(etcd_any: EtcdServer) -> AsyncIterator[EtcdClient]:
    client = EtcdClient(EtcdSettings(endpoints=(etcd_any.url,), timeout=2))
    yield client
    await client.aclose()


async def test_client_speaks_the_gateway(etcd_any: EtcdServer, client: EtcdClient) -> None:
    lease, granted = await client.grant(10)
    assert granted == 10
    assert await client.keepalive(lease) == 10
    await client.put("/k", b"v", lease)
    kv = await client.get("/k")
    assert kv is not None
    assert (kv.value, kv.lease) == (b"v", lease)
    only_key = await client.get("/k", keys_only=True)
    assert only_key is not None
    assert (only_key.key, only_key.value, only_key.lease) == (b"/k", None, lease)
    assert await client.get("/missing") is None
    assert not await client.delete_if_lease("/k", lease + 1)  # guarded: not ours
    assert etcd_any.get("/k") is not None
    assert await client.delete_if_lease("/k", lease)
    assert etcd_any.get("/k") is None
    assert await client.revoke(lease)
    assert await client.keepalive(lease) <= 0  # a lost lease is a 200 without TTL
    with pytest.raises(LeaseNotFound):
        await client.put("/k", b"v", lease)  # 404 with gRPC code 5
    assert not await client.revoke(lease)  # revoking twice is fine, and says so


async def test_no_endpoint_answers_is_unavailable() -> None:
    client = EtcdClient(EtcdSettings(endpoints=(f"http://127.0.0.1:{free_port()}",), timeout=1))
    with pytest.raises(EtcdUnavailable, match="connection refused"):
        await client.grant(5)
    await client.aclose()


async def test_fails_over_to_the_next_endpoint(etcd_any: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = EtcdClient(EtcdSettings(endpoints=(dead, etcd_any.url), timeout=1))
    assert (await client.grant(5))[0] > 0
    assert client.endpoint == etcd_any.url
    await client.aclose()


async def test_announce_writes_valid_json_on_own_lease(etcd_any: EtcdServer, client: EtcdClient) -> None:
    registrar = EtcdRegistrar(client, ttl=10)
    assert await registrar.announce(KEY, RECORD)
    kv = etcd_any.get(KEY)
    assert kv is not None
    assert kv["lease"] == registrar.lease
    assert json.loads(kv["value"]) == {"host": "node-1", "ipv4_addr": "127.0.0.1", "port": 5555, "zone": "a"}
    # announcing the same record again writes nothing, and says so
    revision = etcd_any.revision()
    assert not await registrar.announce(KEY, RECORD)
    assert etcd_any.revision() == revision


async def test_refresh_costs_no_revision(etcd_any: EtcdServer, client: EtcdClient) -> None:
    registrar = EtcdRegistrar(client, ttl=10)
    await registrar.announce(KEY, RECORD)
    watcher = Watcher(etcd_any, "/services/")
    revision = etcd_any.revision()
    for _ in range(5):
        await registrar.refresh()
    assert etcd_any.revision() == revision
    assert watcher.events == []
    watcher.close()


async def test_refresh_puts_back_a_deleted_record_but_leaves_a_successor(
    etcd_any: EtcdServer, client: EtcdClient
) -> None:
    registrar = EtcdRegistrar(client, ttl=10)
    await registrar.announce(KEY, RECORD)
    etcd_any.delete(KEY)
    await registrar.refresh()
    kv = etcd_any.get(KEY)
    assert kv is not None
    assert kv["lease"] == registrar.lease
    # a successor takes the key over on its own lease: refresh must not touch it
    other = etcd_any.grant(10)
    etcd_any.put(KEY, '{"host":"successor"}', other)
    await registrar.refresh()
    await registrar.refresh()
    assert etcd_any.value(KEY) == {"host": "successor"}


async def test_withdraw_and_close_never_delete_a_successor(etcd_any: EtcdServer, client: EtcdClient) -> None:
    old = EtcdRegistrar(client, ttl=10)
    await old.announce(KEY, RECORD)
    new_client = EtcdClient(EtcdSettings(endpoints=(etcd_any.url,)))
    new = EtcdRegistrar(new_client, ttl=10)
    await new.announce(KEY, Record("node-2", "127.0.0.1", 5555))  # the newest healthy instance wins
    assert etcd_any.value(KEY)["host"] == "node-2"
    old_lease = old.lease
    assert old_lease is not None
    await old.withdraw(KEY)
    await old.close()  # a late stop of the old instance
    kv = etcd_any.get(KEY)
    assert kv is not None
    assert kv["lease"] == new.lease
    assert json.loads(kv["value"])["host"] == "node-2"
    assert etcd_any.lease_ttl(old_lease) == -1  # the old lease was revoked
    await new.close()
    assert etcd_any.get(KEY) is None
    await new_client.aclose()


async def test_lease_lost_is_regranted_and_record_put_again(etcd_any: EtcdServer, client: EtcdClient) -> None:
    registrar = EtcdRegistrar(client, ttl=10)
    await registrar.announce(KEY, RECORD)
    first = registrar.lease
    assert first is not None
    etcd_any.call("/v3/lease/revoke", {"ID": str(first)})  # as if it had expired
    assert etcd_any.get(KEY) is None
    refreshed = await registrar.refresh()
    assert refreshed.lease_lost
    assert refreshed.restored == (KEY,)
    assert registrar.lease not in (None, first)
    kv = etcd_any.get(KEY)
    assert kv is not None
    assert kv["lease"] == registrar.lease


async def test_withdrawn_registrar_keeps_its_lease_alive(etcd_any: EtcdServer, client: EtcdClient) -> None:
    registrar = EtcdRegistrar(client, ttl=10)
    await registrar.announce(KEY, RECORD)
    await registrar.withdraw(KEY)
    assert etcd_any.get(KEY) is None
    lease = registrar.lease
    assert lease is not None
    refreshed = await registrar.refresh()
    assert registrar.lease == lease
    assert refreshed.ttl == 10
    assert not refreshed.lease_lost
    await registrar.announce(KEY, RECORD)
    assert etcd_any.get(KEY)["lease"] == lease  # type: ignore[index]  # one lease for the agent's life


async def test_a_failed_withdraw_leaves_the_record_wanted(etcd_any: EtcdServer, client: EtcdClient) -> None:
    # The agent retries a failed withdraw; until one succeeds, or the service recovers and
    # wants the record after all, the registrar must keep treating the record as its own.
    registrar = EtcdRegistrar(client, ttl=10)
    await registrar.announce(KEY, RECORD)
    etcd_any.stop()
    with pytest.raises(EtcdUnavailable):
        await registrar.withdraw(KEY)
    etcd_any.start()
    etcd_any.delete(KEY)
    await registrar.refresh()
    assert etcd_any.get(KEY) is not None  # put back: still wanted
    await registrar.withdraw(KEY)
    assert etcd_any.get(KEY) is None


async def test_several_keys_read_in_one_request(etcd_any: EtcdServer, client: EtcdClient) -> None:
    lease, _ = await client.grant(10)
    await client.put("/a", b"1", lease)
    await client.put("/c", b"\xff\xfe", 0)  # any bytes another client wrote
    found = await client.get_many(["/a", "/b", "/c"], keys_only=True)
    assert [kv.lease if kv else None for kv in found] == [lease, None, 0]
    assert [kv.value if kv else None for kv in found] == [None, None, None]
    with_values = await client.get_many(["/a", "/c"])
    assert [kv.value for kv in with_values if kv] == [b"1", b"\xff\xfe"]


async def test_remove_stale_is_guarded_on_the_revision(etcd_any: EtcdServer, client: EtcdClient) -> None:
    registrar = EtcdRegistrar(client, ttl=10)
    crashed = etcd_any.grant(30)
    etcd_any.put(KEY, '{"host":"crashed"}', crashed)
    assert await registrar.remove_stale(KEY) == crashed
    assert etcd_any.get(KEY) is None
    # a live agent rewrites the record between the look and the delete: it is left alone
    etcd_any.put(KEY, '{"host":"old"}', crashed)
    real_get = client.get

    async def get_then_rewrite(key: str, *, keys_only: bool = False):  # type: ignore[no-untyped-def]
        seen = await real_get(key, keys_only=keys_only)
        etcd_any.put(KEY, '{"host":"live"}', crashed)
        return seen

    client.get = get_then_rewrite  # type: ignore[method-assign]
    assert await registrar.remove_stale(KEY) is None
    client.get = real_get  # type: ignore[method-assign]
    assert etcd_any.value(KEY) == {"host": "live"}
    # our own record is never "stale"
    await registrar.announce(KEY, RECORD)
    assert await registrar.remove_stale(KEY) is None
    assert etcd_any.get(KEY)["lease"] == registrar.lease  # type: ignore[index]


async def test_many_records_are_read_and_withdrawn_in_batches(
    etcd_any: EtcdServer, client: EtcdClient
) -> None:
    # etcd refuses a transaction of more than 128 operations (--max-txn-ops): a host with more
    # services than that is read and withdrawn in several requests, never refused.
    registrar = EtcdRegistrar(client, ttl=10)
    keys = [f"/services/many/127.0.0.1:{port}" for port in range(20000, 20150)]
    for key in keys:
        await registrar.announce(key, Record("node-1", "127.0.0.1", int(key.rsplit(":", 1)[1])))
    etcd_any.delete(keys[149])
    refreshed = await registrar.refresh()
    assert refreshed.restored == (keys[149],)  # the 150 keys were all looked at
    assert all(registrar.holds(key, 0.0) for key in keys)
    closed = await registrar.close()
    assert sorted(closed.withdrawn) == sorted(keys)
    assert closed.revoked
    assert all(etcd_any.get(key) is None for key in keys[::25])
