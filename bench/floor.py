"""The floor a prober cannot go below in Python: bare asyncio, one probe per interval, nothing else.

python bench/floor.py KIND TARGET INTERVAL

KIND is http, tcp, postgres, mysql or redis; TARGET is host:port (tcp, http) or the
URL the driver takes. Each probe opens a fresh connection, as announcer's do, and
uses the same driver announcer uses for that kind, so announcer's cost over this is
what announcer itself adds: scheduling, the state machine, logs, metrics, the lease.
It prints "ready" once it has imported what it needs, and a line for a failed probe.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import Awaitable, Callable


async def http(target: str) -> None:
    host, port = target.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        status = await reader.readline()
        if not status.startswith(b"HTTP/1.") or status.split()[1][:1] not in (b"2", b"3"):
            raise RuntimeError(status)
    finally:
        writer.close()
        await writer.wait_closed()


async def tcp(target: str) -> None:
    host, port = target.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.close()
    await writer.wait_closed()


async def postgres(target: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(target)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


async def mysql(target: str) -> None:
    import aiomysql

    host, port = target.rsplit(":", 1)
    conn = await aiomysql.connect(host=host, port=int(port), user="root", password="")
    try:
        async with conn.cursor() as cursor:
            await cursor.execute("SELECT 1")
    finally:
        conn.close()


async def redis(target: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(target, single_connection_client=True)
    try:
        await client.ping()
    finally:
        await client.aclose()


PROBES: dict[str, Callable[[str], Awaitable[None]]] = {
    "http": http, "tcp": tcp, "postgres": postgres, "mysql": mysql, "redis": redis,
}  # fmt: skip
DRIVERS = {"postgres": "asyncpg", "mysql": "aiomysql", "redis": "redis.asyncio"}


async def main(kind: str, target: str, interval: float) -> None:
    probe = PROBES[kind]
    driver = DRIVERS.get(kind)
    if driver is not None:
        importlib.import_module(driver)  # before the first round, as announcer does
    print("ready", flush=True)
    deadline = time.monotonic()
    while True:
        try:
            await asyncio.wait_for(probe(target), interval / 2)
        except Exception as exc:
            print(f"failed {type(exc).__name__}", flush=True)
        deadline += interval
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
