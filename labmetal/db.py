"""Engine, sessions and migrations for SQLite (embedded default) and PostgreSQL (several
conductors)."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

LOG = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


class Database:
    """Hands out sessions. ``write()`` sessions take the write lock up front on SQLite
    (BEGIN IMMEDIATE), so a read-then-write transaction never fails half-way with
    "database is locked"; PostgreSQL needs nothing special."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            if self.sqlite_path:
                _create_private(self.sqlite_path)
            self.engine = create_engine(url, connect_args={"check_same_thread": False,
                                                           "timeout": 60},
                                        pool_size=20, max_overflow=40)
            _make_sqlite_behave(self.engine)
        else:
            self.engine = create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(labmetal_write=True),
                                    expire_on_commit=False)

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, None for PostgreSQL or an in-memory database."""
        path = self.url.split("///", 1)[1] if self.is_sqlite and "///" in self.url else ""
        return Path(path) if path and path != ":memory:" else None

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception."""
        with self._writer() as session, session.begin():
            yield session

    def upgrade(self) -> None:
        migrate(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


def _create_private(path: Path) -> None:
    """The database holds password hashes and tokens: its directory is made 0700 and the
    file 0600 before SQLite opens it (SQLite gives its -wal and -shm files the database
    file's mode), whatever the umask of the command that makes it first."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _make_sqlite_behave(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN until the first write and cannot do
    # BEGIN IMMEDIATE; take over, as SQLAlchemy's documentation recommends.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        immediate = conn.get_execution_options().get("labmetal_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to head. Several processes may start at once on PostgreSQL:
    an advisory lock makes them take turns."""
    cfg = alembic_config(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7400263)"))
            try:
                cfg.attributes["connection"] = conn
                alembic_command.upgrade(cfg, "head")
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7400263)"))
                conn.commit()
    else:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            alembic_command.upgrade(cfg, "head")
