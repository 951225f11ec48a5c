"""Initial schema: the tables of cnidose.records.schema, and the triggers that keep signed assessments
immutable and the audit log append-only (SQLite and PostgreSQL).

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


_GUARDS = {  # trigger name -> (table, condition on OLD or None, message)
    "audit_log_no_update": ("audit_log", "UPDATE", None, "the audit log is append-only"),
    "audit_log_no_delete": ("audit_log", "DELETE", None, "the audit log is append-only"),
    "assessments_signed_no_update": ("assessments", "UPDATE", "OLD.status = 'signed'",
                                     "a signed assessment is immutable"),
    "assessments_signed_no_delete": ("assessments", "DELETE", "OLD.status = 'signed'",
                                     "a signed assessment is immutable"),
}


def _create_guards() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("CREATE FUNCTION cnidose_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                   "$$ BEGIN RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation'; END $$")
    for name, (table, event, when, message) in _GUARDS.items():
        if dialect == "postgresql":
            cond = f" WHEN ({when})" if when else ""
            op.execute(f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW{cond} "
                       f"EXECUTE FUNCTION cnidose_refuse('{message}')")
        elif dialect == "sqlite":
            cond = f" WHEN {when}" if when else ""
            op.execute(f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW{cond} "
                       f"BEGIN SELECT RAISE(ABORT, '{message}'); END")
        else:
            raise RuntimeError(f"cnidose supports SQLite and PostgreSQL, not {dialect}")


def _drop_guards() -> None:
    dialect = op.get_bind().dialect.name
    for name, (table, *_rest) in _GUARDS.items():
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if dialect == "postgresql" else ""))
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS cnidose_refuse()")



def upgrade() -> None:
    op.create_table('patients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mrn', sa.String(length=64), nullable=False),
    sa.Column('family_name', sa.String(length=128), nullable=False),
    sa.Column('given_name', sa.String(length=128), nullable=False),
    sa.Column('birth_date', sa.Date(), nullable=False),
    sa.Column('sex', sa.String(length=8), nullable=False),
    sa.Column('agent', sa.String(length=32), nullable=False),
    sa.Column('indication', sa.String(length=64), nullable=False),
    sa.Column('therapy_start', sa.Date(), nullable=True),
    sa.Column('transplant_date', sa.Date(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("sex IN ('female', 'male', 'other', 'unknown')", name='ck_patients_sex'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('mrn')
    )
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=256), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("role <> 'patient' OR patient_id IS NOT NULL", name='ck_users_patient_link'),
    sa.CheckConstraint("role IN ('clinician', 'pharmacist', 'admin', 'patient')", name='ck_users_role'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('username')
    )
    op.create_table('appointments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('department', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('starts_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ends_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=12), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('contact_name', sa.String(length=128), nullable=True),
    sa.Column('contact_email', sa.String(length=254), nullable=True),
    sa.Column('source', sa.String(length=128), nullable=True),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('requested', 'confirmed', 'cancelled', 'done')", name='ck_appointments_status'),
    sa.CheckConstraint('ends_at > starts_at', name='ck_appointments_order'),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('appointments', schema=None) as batch_op:
        batch_op.create_index('ix_appointments_department', ['department', 'starts_at'], unique=False)

    op.create_table('assessments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('inputs', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('model_ref', sa.String(length=128), nullable=True),
    sa.Column('package_version', sa.String(length=32), nullable=False),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('decision', sa.Text(), nullable=True),
    sa.Column('signed_by', sa.Integer(), nullable=True),
    sa.Column('signed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('recommendation', 'assessment')", name='ck_assessments_kind'),
    sa.CheckConstraint("status <> 'signed' OR (signed_by IS NOT NULL AND signed_at IS NOT NULL)",
                       name='ck_assessments_signature'),
    sa.CheckConstraint("status IN ('draft', 'signed')", name='ck_assessments_status'),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['signed_by'], ['users.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('assessments', schema=None) as batch_op:
        batch_op.create_index('ix_assessments_patient', ['patient_id', 'created_at'], unique=False)

    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('action', sa.String(length=24), nullable=False),
    sa.Column('object_type', sa.String(length=32), nullable=False),
    sa.Column('object_id', sa.String(length=64), nullable=True),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index('ix_audit_at', ['at'], unique=False)
        batch_op.create_index('ix_audit_object', ['object_type', 'object_id'], unique=False)

    op.create_table('covariates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('unit', sa.String(length=16), nullable=False),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('entered_by', sa.Integer(), nullable=True),
    sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('final', 'entered-in-error')", name='ck_covariates_status'),
    sa.ForeignKeyConstraint(['entered_by'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('covariates', schema=None) as batch_op:
        batch_op.create_index('ix_covariates_patient', ['patient_id', 'measured_at'], unique=False)

    op.create_table('medications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('rxnorm', sa.String(length=16), nullable=True),
    sa.Column('daily_mg', sa.Float(), nullable=True),
    sa.Column('start_on', sa.Date(), nullable=False),
    sa.Column('stop_on', sa.Date(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('entered_by', sa.Integer(), nullable=True),
    sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('final', 'entered-in-error')", name='ck_medications_status'),
    sa.ForeignKeyConstraint(['entered_by'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('observations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('category', sa.String(length=8), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('code', sa.String(length=16), nullable=True),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('unit', sa.String(length=16), nullable=False),
    sa.Column('observed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('blq', sa.Boolean(), nullable=False),
    sa.Column('lloq', sa.Float(), nullable=True),
    sa.Column('assay', sa.String(length=32), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('entered_by', sa.Integer(), nullable=True),
    sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("category IN ('level', 'lab', 'vital')", name='ck_observations_category'),
    sa.CheckConstraint("status IN ('final', 'entered-in-error')", name='ck_observations_status'),
    sa.ForeignKeyConstraint(['entered_by'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('observations', schema=None) as batch_op:
        batch_op.create_index('ix_observations_patient', ['patient_id', 'observed_at'], unique=False)

    op.create_table('regimens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('drug', sa.String(length=32), nullable=False),
    sa.Column('product', sa.String(length=64), nullable=False),
    sa.Column('route', sa.String(length=16), nullable=False),
    sa.Column('dose_mg', sa.Float(), nullable=False),
    sa.Column('interval_h', sa.Float(), nullable=False),
    sa.Column('start_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stop_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('entered_by', sa.Integer(), nullable=True),
    sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('final', 'entered-in-error')", name='ck_regimens_status'),
    sa.CheckConstraint('dose_mg > 0 AND interval_h > 0', name='ck_regimens_positive'),
    sa.ForeignKeyConstraint(['entered_by'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('regimens', schema=None) as batch_op:
        batch_op.create_index('ix_regimens_patient', ['patient_id', 'start_at'], unique=False)

    op.create_table('doses',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('drug', sa.String(length=32), nullable=False),
    sa.Column('product', sa.String(length=64), nullable=False),
    sa.Column('route', sa.String(length=16), nullable=False),
    sa.Column('amount_mg', sa.Float(), nullable=False),
    sa.Column('given_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('infusion_h', sa.Float(), nullable=True),
    sa.Column('regimen_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('entered_by', sa.Integer(), nullable=True),
    sa.Column('entered_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('final', 'entered-in-error')", name='ck_doses_status'),
    sa.CheckConstraint('amount_mg > 0', name='ck_doses_positive'),
    sa.ForeignKeyConstraint(['entered_by'], ['users.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['regimen_id'], ['regimens.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('doses', schema=None) as batch_op:
        batch_op.create_index('ix_doses_patient', ['patient_id', 'given_at'], unique=False)
    _create_guards()


def downgrade() -> None:
    _drop_guards()
    with op.batch_alter_table('doses', schema=None) as batch_op:
        batch_op.drop_index('ix_doses_patient')

    op.drop_table('doses')
    with op.batch_alter_table('regimens', schema=None) as batch_op:
        batch_op.drop_index('ix_regimens_patient')

    op.drop_table('regimens')
    with op.batch_alter_table('observations', schema=None) as batch_op:
        batch_op.drop_index('ix_observations_patient')

    op.drop_table('observations')
    op.drop_table('medications')
    with op.batch_alter_table('covariates', schema=None) as batch_op:
        batch_op.drop_index('ix_covariates_patient')

    op.drop_table('covariates')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_object')
        batch_op.drop_index('ix_audit_at')

    op.drop_table('audit_log')
    with op.batch_alter_table('assessments', schema=None) as batch_op:
        batch_op.drop_index('ix_assessments_patient')

    op.drop_table('assessments')
    with op.batch_alter_table('appointments', schema=None) as batch_op:
        batch_op.drop_index('ix_appointments_department')

    op.drop_table('appointments')
    op.drop_table('users')
    op.drop_table('patients')
