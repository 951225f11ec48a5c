"""Where the record lives: the database URL, the engine, and the schema migrations (Alembic).

SQLite by default -- a file in the user's data directory (``$XDG_DATA_HOME/cnidose/cnidose.db``, else
``~/.local/share/cnidose/cnidose.db``) -- or any SQLAlchemy URL in ``CNIDOSE_DATABASE_URL``, e.g.
``postgresql+psycopg://cnidose@/cnidose`` (the ``postgresql`` extra installs the driver). The schema is
created and upgraded only by the migrations in ``cnidose/records/migrations``; ``upgrade`` is idempotent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import ArgumentError

from cnidose.errors import InputError

__all__ = ["HEAD", "database_url", "make_engine", "revision", "upgrade"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD = "0004"


def database_url() -> str:
    """``CNIDOSE_DATABASE_URL``, or the SQLite file in the user's data directory (its folder created)."""
    url = os.environ.get("CNIDOSE_DATABASE_URL")
    if url:
        return url
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "cnidose"
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'cnidose.db'}"


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (default :func:`database_url`). SQLite gets foreign keys enforced, WAL
    journalling (readers do not block the writer) and a busy timeout; PostgreSQL a pre-ping pool."""
    url = url or database_url()
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA foreign_keys = ON")
                if ":memory:" not in url and url != "sqlite://":
                    cur.execute("PRAGMA journal_mode = WAL")
                    cur.execute("PRAGMA synchronous = FULL")  # an acknowledged commit survives a crash
                cur.close()

            return engine
        return create_engine(url, pool_pre_ping=True, **kwargs)
    except (ArgumentError, ImportError) as exc:  # a malformed URL, an unknown dialect or a missing driver
        raise InputError(f"cannot use the database {_safe(url)}: {exc}") from None


def _safe(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparsable URL)"


def _config(connection: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, target: str = "head") -> None:
    """Bring the schema to ``target`` (default: the newest migration)."""
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(_config(conn), target)


def revision(engine: Engine) -> str | None:
    """The schema's migration revision, or None for an empty database."""
    if not inspect(engine).has_table("alembic_version"):
        return None
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
