"""The machine's real database servers, as fixtures: reachable, or a clear skip/failure."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator

import aiomysql
import asyncpg
import pytest
import redis.asyncio

from tests.servers import require

PG = "postgresql://postgres@127.0.0.1:5432/postgres"
TEST_USER, TEST_PASSWORD = "announcer_pw", "announcer-Secret-42"


@pytest.fixture
async def postgres() -> AsyncIterator[asyncpg.Connection]:
    """An admin connection to the local PostgreSQL, with the password-checked test role."""
    try:
        admin = await asyncio.wait_for(asyncpg.connect(PG), 5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        require(f"PostgreSQL on 127.0.0.1:5432 not reachable ({exc})")
    exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", TEST_USER)
    if not exists:
        await admin.execute(f"CREATE ROLE {TEST_USER} LOGIN")
    await admin.execute(f"ALTER ROLE {TEST_USER} PASSWORD '{TEST_PASSWORD}'")
    yield admin
    await admin.close()


@pytest.fixture
async def postgres_checks_passwords(postgres: asyncpg.Connection) -> None:
    try:
        conn = await asyncpg.connect(f"postgresql://{TEST_USER}:wrong@127.0.0.1:5432/postgres")
    except asyncpg.InvalidPasswordError:
        return
    await conn.close()
    require("PostgreSQL trusts announcer_pw on 127.0.0.1: run scripts/setup-test-services.sh (as root)")


@pytest.fixture
async def mysql() -> AsyncIterator[aiomysql.Connection]:
    try:
        admin = await asyncio.wait_for(
            aiomysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True), 5
        )
    except (OSError, aiomysql.Error, TimeoutError) as exc:
        require(f"MariaDB on 127.0.0.1:3306 not reachable as root ({exc})")
    try:
        async with admin.cursor() as cursor:
            for host in ("127.0.0.1", "localhost"):
                # IF NOT EXISTS on an existing user is a server note, which aiomysql turns into a warning.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    await cursor.execute(
                        f"CREATE USER IF NOT EXISTS '{TEST_USER}'@'{host}' IDENTIFIED BY '{TEST_PASSWORD}'"
                    )
                await cursor.execute(f"ALTER USER '{TEST_USER}'@'{host}' IDENTIFIED BY '{TEST_PASSWORD}'")
        yield admin
    finally:
        admin.close()


@pytest.fixture
async def redis_server() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis(host="127.0.0.1", port=6379, single_connection_client=True)
    try:
        await asyncio.wait_for(client.ping(), 5)
    except (OSError, redis.RedisError, TimeoutError) as exc:
        await client.aclose()
        require(f"Redis on 127.0.0.1:6379 not reachable ({exc})")
    # An ACL user with a password (kept in memory only; gone when Redis restarts).
    await client.acl_setuser(
        TEST_USER, enabled=True, passwords=[f"+{TEST_PASSWORD}"], commands=["+ping", "+role"]
    )
    yield client
    await client.acl_deluser(TEST_USER)
    await client.aclose()
