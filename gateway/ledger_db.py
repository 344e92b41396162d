"""The usage ledger's database: one table, ``usage_records``, through SQLAlchemy 2 (SQLite by
default, PostgreSQL when ``RAGLINE_DATABASE_URL`` names one), its schema made and upgraded by
Alembic (``gateway/migrations``). Every call here is blocking: the ledger runs them in a worker
thread, never on the event loop. The pool is small and bounded: a gateway process holds at most
two connections, however busy it is."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine

metadata = MetaData()
usage = Table(
    "usage_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False, unique=True),  # replays insert once
    Column("ts", Float, nullable=False, index=True),  # seconds since the epoch, UTC
    Column("day", String(10), nullable=False, index=True),  # YYYY-MM-DD, UTC
    Column("key_id", String(64), nullable=False, index=True),
    Column("team", String(64)),
    Column("model", String(200), nullable=False),
    Column("route", String(32), nullable=False),  # chat, completions, responses, embeddings
    Column("served_by", String(200)),
    Column("adapter", String(200)),
    Column("variant", String(200)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cached", Boolean, nullable=False),
    Column("status", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("cost", Float, nullable=False),
)

GROUPS = ("key_id", "team", "model", "route", "variant", "day", "adapter", "status")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


@dataclass
class UsageRecord:
    request_id: str
    ts: float
    day: str
    key_id: str
    team: str | None
    model: str
    route: str
    served_by: str | None
    adapter: str | None
    variant: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    status: int
    latency_ms: float
    ttft_ms: float | None
    cost: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def engine_for(url: str) -> Engine:
    """A bounded engine: SQLite in WAL mode with a busy timeout (several processes share the
    file); PostgreSQL with a pool of two and no overflow."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, pool_size=2, max_overflow=0)

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(
        url, pool_size=2, max_overflow=0, pool_pre_ping=True, pool_timeout=10,
        connect_args={"connect_timeout": 3},
    )  # fmt: skip


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration; several processes may start at once (a
    PostgreSQL advisory lock, or SQLite's write lock, lets one migrate at a time)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(7245100)"))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


_COLUMNS = [c.name for c in usage.columns if c.name != "id"]


def insert(engine: Engine, records: Sequence[UsageRecord]) -> int:
    """Insert, skipping request ids already there (a replayed spool); returns rows written.
    One prepared statement through the driver's own executemany (rows as tuples): a second of
    a busy gateway's records costs a few milliseconds of one core, not tens."""
    if not records:
        return 0
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    sql = (
        f"INSERT INTO usage_records ({', '.join(_COLUMNS)}) "
        f"VALUES ({', '.join([mark] * len(_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING"
    )
    rows = [tuple(getattr(r, c) for c in _COLUMNS) for r in records]
    with engine.begin() as connection:
        result = connection.exec_driver_sql(sql, rows)
    return max(int(result.rowcount or 0), 0)


def purge(engine: Engine, older_than_days: float) -> int:
    cutoff = time.time() - older_than_days * 86400
    with engine.begin() as connection:
        return int(connection.execute(delete(usage).where(usage.c.ts < cutoff)).rowcount or 0)


def summarize(
    engine: Engine,
    group_by: Iterable[str],
    start: float | None = None,
    end: float | None = None,
    key_id: str | None = None,
) -> list[dict[str, Any]]:
    """Requests, tokens, cost, errors, cache hits and latency per group, newest day first."""
    groups = [usage.c[g] for g in group_by]
    columns = [
        *groups,
        func.count().label("requests"),
        func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
        func.sum(usage.c.completion_tokens).label("completion_tokens"),
        func.sum(usage.c.cost).label("cost"),
        func.sum(func.cast(usage.c.status >= 400, Integer)).label("errors"),
        func.sum(func.cast(usage.c.cached, Integer)).label("cached"),
        func.avg(usage.c.latency_ms).label("mean_latency_ms"),
        func.avg(usage.c.ttft_ms).label("mean_ttft_ms"),
    ]
    query = select(*columns)
    if start is not None:
        query = query.where(usage.c.ts >= start)
    if end is not None:
        query = query.where(usage.c.ts < end)
    if key_id is not None:
        query = query.where(usage.c.key_id == key_id)
    if groups:
        query = query.group_by(*groups).order_by(*groups)
    with engine.connect() as connection:
        out = []
        for row in connection.execute(query):
            item = dict(row._mapping)
            for name in ("prompt_tokens", "completion_tokens", "errors", "cached"):
                item[name] = int(item[name] or 0)
            item["cost"] = round(float(item["cost"] or 0.0), 8)
            for name in ("mean_latency_ms", "mean_ttft_ms"):
                item[name] = None if item[name] is None else round(float(item[name]), 2)
            out.append(item)
    return out


def series_rows(
    engine: Engine, window: float, limit: int = 200_000
) -> list[tuple[float, float, float | None, int, int, bool]]:
    """(ts, latency, ttft, tokens, status, cached) of the last ``window`` seconds' requests."""
    since = time.time() - window
    columns = (
        usage.c.ts,
        usage.c.latency_ms,
        usage.c.ttft_ms,
        usage.c.prompt_tokens + usage.c.completion_tokens,
        usage.c.status,
        usage.c.cached,
    )
    query = select(*columns).where(usage.c.ts >= since).order_by(usage.c.ts.desc()).limit(limit)
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(query)]


def count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(usage)).scalar() or 0)


def as_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()
