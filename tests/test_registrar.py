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
    lease = await client.grant(10)
    assert await client.keepalive(lease) == 10
    await client.put("/k", "v", lease)
    kv = await client.get("/k")
    assert kv is not None
    assert (kv.value, kv.lease) == ("v", lease)
    assert await client.get("/missing") is None
    assert not await client.delete_if_lease("/k", lease + 1)  # guarded: not ours
    assert etcd_any.get("/k") is not None
    assert await client.delete_if_lease("/k", lease)
    assert etcd_any.get("/k") is None
    await client.revoke(lease)
    assert await client.keepalive(lease) <= 0  # a lost lease is a 200 without TTL
    with pytest.raises(LeaseNotFound):
        await client.put("/k", "v", lease)  # 404 with gRPC code 5
    await client.revoke(lease)  # revoking twice is fine


async def test_no_endpoint_answers_is_unavailable() -> None:
    client = EtcdClient(EtcdSettings(endpoints=(f"http://127.0.0.1:{free_port()}",), timeout=1))
    with pytest.raises(EtcdUnavailable, match="connection refused"):
        await client.grant(5)
    await client.aclose()


async def test_fails_over_to_the_next_endpoint(etcd_any: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = EtcdClient(EtcdSettings(endpoints=(dead, etcd_any.url), timeout=1))
    assert await client.grant(5) > 0
    assert client.endpoint == etcd_any.url
    await client.aclose()


async def test_announce_writes_valid_json_on_own_lease(etcd_any: EtcdServer, client: EtcdClient) -> None:
    registrar = EtcdRegistrar(client, KEY, ttl=10)
    await registrar.announce(RECORD)
    kv = etcd_any.get(KEY)
    assert kv is not None
    assert kv["lease"] == registrar.lease
    assert json.loads(kv["value"]) == {"host": "node-1", "ipv4_addr": "127.0.0.1", "port": 5555, "zone": "a"}
    # announcing the same record again writes nothing
    revision = etcd_any.revision()
    await registrar.announce(RECORD)
    assert etcd_any.revision() == revision


async def test_refresh_costs_no_revision(etcd_any: EtcdServer, client: EtcdClient) -> None:
    registrar = EtcdRegistrar(client, KEY, ttl=10)
    await registrar.announce(RECORD)
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
    registrar = EtcdRegistrar(client, KEY, ttl=10)
    await registrar.announce(RECORD)
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
    old = EtcdRegistrar(client, KEY, ttl=10)
    await old.announce(RECORD)
    new_client = EtcdClient(EtcdSettings(endpoints=(etcd_any.url,)))
    new = EtcdRegistrar(new_client, KEY, ttl=10)
    await new.announce(Record("node-2", "127.0.0.1", 5555))  # the newest healthy instance wins
    assert etcd_any.value(KEY)["host"] == "node-2"
    old_lease = old.lease
    assert old_lease is not None
    await old.withdraw()
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
    registrar = EtcdRegistrar(client, KEY, ttl=10)
    await registrar.announce(RECORD)
    first = registrar.lease
    assert first is not None
    etcd_any.call("/v3/lease/revoke", {"ID": str(first)})  # as if it had expired
    assert etcd_any.get(KEY) is None
    await registrar.refresh()
    assert registrar.lease not in (None, first)
    assert registrar.lease_grants == 2
    kv = etcd_any.get(KEY)
    assert kv is not None
    assert kv["lease"] == registrar.lease


async def test_withdrawn_registrar_keeps_its_lease_alive(etcd_any: EtcdServer, client: EtcdClient) -> None:
    registrar = EtcdRegistrar(client, KEY, ttl=10)
    await registrar.announce(RECORD)
    await registrar.withdraw()
    assert etcd_any.get(KEY) is None
    lease = registrar.lease
    assert lease is not None
    await registrar.refresh()
    assert registrar.lease == lease
    assert registrar.last_ttl == 10
    await registrar.announce(RECORD)
    assert etcd_any.get(KEY)["lease"] == lease  # type: ignore[index]
    assert registrar.lease_grants == 1  # one lease for the life of the agent


async def test_a_failed_withdraw_leaves_the_record_wanted(etcd_any: EtcdServer, client: EtcdClient) -> None:
    # The agent retries a failed withdraw; until one succeeds, or the service recovers and
    # wants the record after all, the registrar must keep treating the record as its own.
    registrar = EtcdRegistrar(client, KEY, ttl=10)
    await registrar.announce(RECORD)
    etcd_any.stop()
    with pytest.raises(EtcdUnavailable):
        await registrar.withdraw()
    etcd_any.start()
    etcd_any.delete(KEY)
    await registrar.refresh()
    assert etcd_any.get(KEY) is not None  # put back: still wanted
    await registrar.withdraw()
    assert etcd_any.get(KEY) is None
