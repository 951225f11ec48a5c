"""Patient revision: a counter on each patient that database triggers raise whenever one of the patient's
clinical entries (covariates, regimens, doses, observations, medications) is inserted, updated or deleted --
whatever SQL is sent. Equal revisions mean equal entries, so a result computed from the entries can be
reused without reading them all again (SQLite and PostgreSQL).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

ENTRY_TABLES = ("covariates", "regimens", "doses", "observations", "medications")
_BUMP = "UPDATE patients SET revision = revision + 1 WHERE id = {row}.patient_id"


def upgrade() -> None:
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revision', sa.Integer(), server_default='0', nullable=False))
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("CREATE FUNCTION cnidose_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "IF TG_OP IN ('UPDATE', 'DELETE') THEN " + _BUMP.format(row="OLD") + "; END IF; "
                   "IF TG_OP IN ('INSERT', 'UPDATE') THEN " + _BUMP.format(row="NEW") + "; END IF; "
                   "RETURN NULL; END $$")
        for table in ENTRY_TABLES:
            op.execute(f"CREATE TRIGGER {table}_revision AFTER INSERT OR UPDATE OR DELETE ON {table} "
                       "FOR EACH ROW EXECUTE FUNCTION cnidose_bump_revision()")
    elif dialect == "sqlite":
        for table in ENTRY_TABLES:
            for event, rows in (("INSERT", ("NEW",)), ("UPDATE", ("OLD", "NEW")), ("DELETE", ("OLD",))):
                body = "; ".join(_BUMP.format(row=r) for r in rows)
                op.execute(f"CREATE TRIGGER {table}_revision_{event.lower()} AFTER {event} ON {table} "
                           f"FOR EACH ROW BEGIN {body}; END")
    else:
        raise RuntimeError(f"cnidose supports SQLite and PostgreSQL, not {dialect}")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in ENTRY_TABLES:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_revision ON {table}")
        else:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_revision_{event}")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS cnidose_bump_revision()")
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_column('revision')
