"""Database engine and sessions: SQLite (WAL, the embedded default) or PostgreSQL, and schema migration.

``make_engine`` builds an engine for a URL (an SQLite file is created readable by its owner only:
``private_database``); ``migrate`` runs Alembic ``upgrade head`` on it (serialised by an advisory lock on PostgreSQL
so several API replicas can start at once). One schema serves both databases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from service.private_files import narrow, private_file
from service.settings import Settings

_MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 7_412_055
# Starlette runs sync endpoints and their dependencies on anyio's worker threads, 40 by default. An SQLite file pool
# that size keeps its connections open under load; QueuePool's default (5 kept, 10 more opened and closed again)
# connected anew, pragmas and all, for every request above 5 at once.
SQLITE_POOL_SIZE = 40
SQLITE_POOL_OVERFLOW = 10


def make_engine(url: str, *, postgres_pool_size: int | None = None) -> Engine:
    """An engine for ``url``. SQLite gets WAL, foreign keys and a busy timeout on every connection, and a file
    database a pool as large as the API's worker threads. PostgreSQL keeps ``postgres_pool_size`` connections
    (default: ``Settings.database_pool_size``'s) and opens no more: a connection opened above the pool and closed
    after one request (SQLAlchemy's overflow) costs a server backend started and stopped each time."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1].split("?", 1)[0] if "///" in url else ""
        in_memory = not path or path == ":memory:" or "mode=memory" in url  # SQLAlchemy's own pool for these
        if not in_memory and not path.startswith("file:"):
            private_database(Path(path))
        pool = {} if in_memory else {"pool_size": SQLITE_POOL_SIZE, "max_overflow": SQLITE_POOL_OVERFLOW}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if postgres_pool_size is None:
        postgres_pool_size = Settings.model_fields["database_pool_size"].default
    return create_engine(url, pool_pre_ping=True, pool_size=postgres_pool_size, max_overflow=0)


def private_database(path: Path) -> None:
    """The SQLite file and its ``-wal`` / ``-shm`` companions readable by their owner only (0600), in a directory
    created 0700: SQLite gives the companions the database file's mode, so the file is created 0600 before the
    first connection."""
    private_file(path)
    for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if companion.exists():
            narrow(companion)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
