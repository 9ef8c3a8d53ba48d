"""The `postgres` kind: a warehouse schema per destination, loaded in micro-batches.

    {"name": "warehouse", "kind": "postgres", "dsn": "postgresql://cdp:...@db:5432/analytics", "schema": "cdp",
     "timeout": "30s", "batch": {"size": 500}}

Tables (created and evolved by the sync: columns are added, never dropped or retyped):
- `profiles`: one row per profile — `profile_id`, `user_id`, `anonymous_id`, `email`, `seq` (its newest change),
  `updated_at`, `uuid_ts` (when loaded), `_seqs` (each column's value's seq), and a column per trait, identify and
  computed alike (agents/sync/warehouse.py names and types them).
- `audience_memberships`: one row per (profile, audience) — `member`, `since`, `seq`, and the identifiers.

A batch is one database transaction: COPY into temporary staging tables, then INSERT ... ON CONFLICT into the
tables, guarded per value by seq, so a repeat (a crash between the commit and the sync's own transaction) or an
older change arriving late never overwrites a newer value. The destination's deliveries leave its queue only after
that commit (the Attempt this returns), and each destination has its own connections: an unreachable or slow
database only holds up its own destination, which retries and says why in GET /v1/destinations.

A value that does not fit its column, and a row Postgres refuses (e.g. a string with a NUL byte), dead-letters that
delivery alone, naming the reason; the rest of its batch is written. `dsn` is write-only (it holds the password).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from agents.sync.destinations import Destination
from agents.sync.payloads import Delivery
from agents.sync.retry import Attempt
from agents.sync.warehouse import Batch, Misfit, check_fits, column_name, fold, sql_type
from topology.destinations import Kind, SenderContext, Settings

SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
MAX_BATCH = 10_000
IDENTIFIERS = ("user_id", "anonymous_id", "email")


def check(settings: Mapping[str, Any]) -> dict[str, Any]:
    checking = Settings("postgres", settings, ("dsn", "schema", "timeout", "batch"))
    dsn = settings.get("dsn")
    if not isinstance(dsn, str) or not dsn.startswith(("postgres://", "postgresql://")):
        checking.problem("dsn is required: postgresql://user:password@host:port/database")
    schema = settings.get("schema")
    if schema is not None and (not isinstance(schema, str) or not SCHEMA.match(schema)):
        checking.problem(f"schema is 1-63 of a-z, 0-9 and '_' not starting with a digit (default: the destination's name), not {schema!r:.80}")
    timeout = checking.duration_ms("timeout", "30s", 1_000, 600_000)
    return checking.done({"dsn": dsn, "schema": schema, "timeout_ms": timeout, "batch_size": checking.batch_size(500, MAX_BATCH)})


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class PostgresSender:
    def __init__(self, destination: Destination, context: SenderContext) -> None:
        settings = destination.settings
        self.dsn, self.timeout_s, self.max_batch = settings["dsn"], settings["timeout_ms"] / 1000, settings["batch_size"]
        self.schema = settings["schema"] or destination.name.replace("-", "_")
        self.concurrency = destination.concurrency
        self._pool: asyncpg.Pool | None = None
        self._columns: dict[str, str] = {}  # the profiles table's columns and their types
        self._ddl = asyncio.Lock()

    @property
    def profiles(self) -> str:
        return f"{quoted(self.schema)}.profiles"

    @property
    def memberships(self) -> str:
        return f"{quoted(self.schema)}.audience_memberships"

    async def send(self, deliveries: Sequence[Delivery]) -> list[Attempt]:
        try:
            pool = await self._connect()
            misfits = await self._misfits(pool, deliveries)
            fitting = [d for d in deliveries if d.id not in misfits]
            refused = await self._load(pool, fitting) if fitting else {}
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._reset(exc)
            return [Attempt(None, f"postgres {self.schema}: {type(exc).__name__}: {exc}"[:300])] * len(deliveries)
        refused.update(misfits)
        return [Attempt(None, refused[d.id], outcome="dead") if d.id in refused else Attempt(None, outcome="delivered") for d in deliveries]

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.concurrency, timeout=self.timeout_s,
                                                   command_timeout=self.timeout_s)  # fmt: skip
        if not self._columns:
            async with self._ddl:
                async with self._pool.acquire() as conn:
                    await self._create(conn)
        return self._pool

    async def _reset(self, exc: BaseException) -> None:
        """After a failure the connections and the known columns may be stale: start over on the next attempt."""
        self._columns = {}
        if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)) and self._pool is not None:
            pool, self._pool = self._pool, None
            pool.terminate()

    async def _create(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await self._lock_schema(conn)
            await self._create_tables(conn)
        await self._read_columns(conn)

    async def _lock_schema(self, conn: asyncpg.Connection) -> None:
        """Changes to the schema one at a time over every worker (IF NOT EXISTS alone races in the catalog)."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"cdp-sync:{self.schema}")

    async def _create_tables(self, conn: asyncpg.Connection) -> None:
        await conn.execute(f"""
            CREATE SCHEMA IF NOT EXISTS {quoted(self.schema)};
            CREATE TABLE IF NOT EXISTS {self.profiles} (
                profile_id text PRIMARY KEY, user_id text, anonymous_id text, email text, seq bigint NOT NULL,
                updated_at timestamptz NOT NULL, uuid_ts timestamptz NOT NULL DEFAULT now(), _seqs jsonb NOT NULL DEFAULT '{{}}');
            CREATE TABLE IF NOT EXISTS {self.memberships} (
                profile_id text NOT NULL, audience text NOT NULL, member boolean NOT NULL, since timestamptz NOT NULL,
                seq bigint NOT NULL, user_id text, anonymous_id text, email text, uuid_ts timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (profile_id, audience));
        """)  # fmt: skip

    async def _read_columns(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'profiles'", self.schema)
        self._columns = {row["column_name"]: row["data_type"] for row in rows}

    async def _misfits(self, pool: asyncpg.Pool, deliveries: Sequence[Delivery]) -> dict[str, str]:
        """Add the columns new traits need (typed by their first value); the deliveries whose value fits no column."""
        proposed: dict[str, str] = {}
        values: list[tuple[Delivery, str, Any]] = []
        for delivery in deliveries:
            kind, _, trait = delivery.subject.partition(":")
            if kind == "trait":
                column, value = column_name(trait), (delivery.payload.get("traits") or {}).get(trait)
                values.append((delivery, column, value))
                if column not in self._columns and column not in proposed and sql_type(value) is not None:
                    proposed[column] = sql_type(value)  # type: ignore[assignment]
        if proposed:
            async with self._ddl, pool.acquire() as conn:
                added = ", ".join(f"ADD COLUMN IF NOT EXISTS {quoted(c)} {t}" for c, t in proposed.items())
                async with conn.transaction():
                    await self._lock_schema(conn)
                    await conn.execute(f"ALTER TABLE {self.profiles} {added}")
                await self._read_columns(conn)  # another worker may have added one first, with another type
        misfits = {}
        for delivery, column, value in values:
            try:
                if column in self._columns:
                    check_fits(column, self._columns[column], value)
            except Misfit as exc:
                misfits[delivery.id] = f"postgres {self.schema}: {exc}"
        return misfits

    async def _load(self, pool: asyncpg.Pool, deliveries: Sequence[Delivery]) -> dict[str, str]:
        """Write the batch in one transaction; if Postgres refuses a value, each delivery alone (the refused dead)."""
        try:
            async with pool.acquire() as conn, conn.transaction():
                await self._write(conn, fold(list(deliveries)))
            return {}
        except asyncpg.DataError as exc:
            if len(deliveries) == 1:
                return {deliveries[0].id: f"postgres {self.schema} refused the value: {exc}"[:300]}
        refused: dict[str, str] = {}
        for delivery in deliveries:
            refused.update(await self._load(pool, [delivery]))
        return refused

    async def _write(self, conn: asyncpg.Connection, batch: Batch) -> None:
        columns = [c for c in batch.columns if c in self._columns]
        staged = ["profile_id", *IDENTIFIERS, "seq", "updated_at", "_seqs", *columns]
        await conn.execute(f"CREATE TEMP TABLE _cdp_profiles (LIKE {self.profiles} INCLUDING DEFAULTS) ON COMMIT DROP")
        await conn.copy_records_to_table("_cdp_profiles", columns=staged, records=[
            (row.profile_id, *row.identifiers.values(), row.seq, ts(row.updated_at),
             orjson.dumps(row.seqs).decode(),
             *(_cell(self._columns[c], row.values.get(c)) for c in columns))
            for row in batch.profiles.values()
        ])  # fmt: skip
        newer = "EXCLUDED.seq > p.seq"
        sets = [f"{c} = CASE WHEN {newer} THEN coalesce(EXCLUDED.{c}, p.{c}) ELSE coalesce(p.{c}, EXCLUDED.{c}) END" for c in IDENTIFIERS]
        sets += ["seq = greatest(p.seq, EXCLUDED.seq)", f"updated_at = CASE WHEN {newer} THEN EXCLUDED.updated_at ELSE p.updated_at END",
                 "uuid_ts = now()"]  # fmt: skip
        for column in columns:
            name, key = quoted(column), column.replace("'", "''")
            sets.append(f"{name} = CASE WHEN (EXCLUDED._seqs->>'{key}')::bigint > coalesce((p._seqs->>'{key}')::bigint, -1)"
                        f" THEN EXCLUDED.{name} ELSE p.{name} END")  # fmt: skip
        sets.append("_seqs = (SELECT coalesce(jsonb_object_agg(key, top), '{}') FROM (SELECT key, max(value::bigint) AS top FROM"
                    " (SELECT key, value #>> '{}' AS value FROM jsonb_each(p._seqs) UNION ALL"
                    "  SELECT key, value #>> '{}' FROM jsonb_each(EXCLUDED._seqs)) AS each GROUP BY key) AS tops)")  # fmt: skip
        names = ", ".join(quoted(c) for c in staged)
        await conn.execute(f"INSERT INTO {self.profiles} AS p ({names}) SELECT {names} FROM _cdp_profiles"
                           f" ON CONFLICT (profile_id) DO UPDATE SET {', '.join(sets)}")  # fmt: skip
        if not batch.memberships:
            return
        await conn.execute(f"CREATE TEMP TABLE _cdp_memberships (LIKE {self.memberships} INCLUDING DEFAULTS) ON COMMIT DROP")
        member_columns = ["profile_id", "audience", "member", "since", "seq", *IDENTIFIERS]
        await conn.copy_records_to_table("_cdp_memberships", columns=member_columns, records=[
            (m.profile_id, m.audience, m.member, ts(m.since), m.seq, *batch.profiles[m.profile_id].identifiers.values())
            for m in batch.memberships.values()
        ])  # fmt: skip
        names = ", ".join(member_columns)
        await conn.execute(f"INSERT INTO {self.memberships} AS m ({names}) SELECT {names} FROM _cdp_memberships"
                           " ON CONFLICT (profile_id, audience) DO UPDATE SET member = EXCLUDED.member, since = EXCLUDED.since,"
                           " seq = EXCLUDED.seq, user_id = EXCLUDED.user_id, anonymous_id = EXCLUDED.anonymous_id,"
                           " email = EXCLUDED.email, uuid_ts = now() WHERE m.seq < EXCLUDED.seq")  # fmt: skip

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except (asyncio.TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()


def _cell(column_type: str, value: Any) -> Any:
    """A value as asyncpg's COPY takes it for a column of this type."""
    if value is None:
        return None
    if column_type == "jsonb":
        return orjson.dumps(value).decode()
    if column_type == "numeric":
        return Decimal(str(value))
    return value


KIND = Kind("postgres", check, PostgresSender, secrets=("dsn",))
