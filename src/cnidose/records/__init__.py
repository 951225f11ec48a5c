"""Persistence and interchange: the clinical record (SQLAlchemy, Alembic migrations; SQLite by default,
PostgreSQL by ``CNIDOSE_DATABASE_URL``) with role checks and an audit trail, and NONMEM-format CSV."""
