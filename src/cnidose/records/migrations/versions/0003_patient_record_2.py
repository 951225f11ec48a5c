"""The patient record, version 2: what the rules read besides doses and levels.

- patients: region (EU/US label variants), the indication's code and severity, donor type and CYP3A5, the
  product, route and strength of the therapy, and the conditions (JSON list);
- observations: the level's sample kind (trough, c2, other) and matrix; doses, regimens and observations:
  the plausibility flags confirmed at entry (JSON list); covariates: the value's source;
- genotypes: a new entry table (gene, result, source, date), with the revision triggers of migration 0002.

Columns are added with ALTER TABLE ADD COLUMN (no table is rebuilt, so the triggers of 0001/0002 stay).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_BUMP = "UPDATE patients SET revision = revision + 1 WHERE id = {row}.patient_id"


def upgrade() -> None:
    for name, col in (("region", sa.Column("region", sa.String(2), server_default="EU", nullable=False)),
                      ("severity", sa.Column("severity", sa.String(64))),
                      ("indication_code", sa.Column("indication_code", sa.String(16))),
                      ("indication_system", sa.Column("indication_system", sa.String(16))),
                      ("donor_type", sa.Column("donor_type", sa.String(16))),
                      ("donor_cyp3a5", sa.Column("donor_cyp3a5", sa.String(32))),
                      ("product", sa.Column("product", sa.String(64))),
                      ("route", sa.Column("route", sa.String(16))),
                      ("strength_percent", sa.Column("strength_percent", sa.Float())),
                      ("conditions", sa.Column("conditions", sa.JSON()))):
        del name
        op.add_column("patients", col)
    op.add_column("observations", sa.Column("sample", sa.String(8)))
    op.add_column("observations", sa.Column("matrix", sa.String(32)))
    for table in ("observations", "doses", "regimens", "covariates", "medications"):
        op.add_column(table, sa.Column("flags", sa.JSON()))
    op.add_column("covariates", sa.Column("source", sa.Text()))
    op.create_table(
        "genotypes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("patient_id", sa.Integer(), sa.ForeignKey("patients.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("gene", sa.String(16), nullable=False),
        sa.Column("result", sa.String(64), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("tested_on", sa.Date()),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("status_reason", sa.Text()),
        sa.Column("entered_by", sa.Integer(), sa.ForeignKey("users.id", ondelete="RESTRICT")),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("flags", sa.JSON()),
        sa.CheckConstraint("status IN ('final', 'entered-in-error')", name="ck_genotypes_status"),
    )
    op.create_index("ix_genotypes_patient", "genotypes", ["patient_id"])
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":  # the function of migration 0002
        op.execute("CREATE TRIGGER genotypes_revision AFTER INSERT OR UPDATE OR DELETE ON genotypes "
                   "FOR EACH ROW EXECUTE FUNCTION cnidose_bump_revision()")
    elif dialect == "sqlite":
        for event, rows in (("INSERT", ("NEW",)), ("UPDATE", ("OLD", "NEW")), ("DELETE", ("OLD",))):
            body = "; ".join(_BUMP.format(row=r) for r in rows)
            op.execute(f"CREATE TRIGGER genotypes_revision_{event.lower()} AFTER {event} ON genotypes "
                       f"FOR EACH ROW BEGIN {body}; END")
    else:
        raise RuntimeError(f"cnidose supports SQLite and PostgreSQL, not {dialect}")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS genotypes_revision ON genotypes")
    else:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS genotypes_revision_{event}")
    op.drop_index("ix_genotypes_patient", "genotypes")
    op.drop_table("genotypes")
    with op.batch_alter_table("covariates") as b:
        b.drop_column("source")
    for table in ("observations", "doses", "regimens", "covariates", "medications"):
        with op.batch_alter_table(table) as b:
            b.drop_column("flags")
    with op.batch_alter_table("observations") as b:
        b.drop_column("matrix")
        b.drop_column("sample")
    with op.batch_alter_table("patients") as b:
        for name in ("conditions", "strength_percent", "route", "product", "donor_cyp3a5", "donor_type",
                     "indication_system", "indication_code", "severity", "region"):
            b.drop_column(name)
