"""Server-side sessions, and one confirmed visit per slot enforced by the database.

- sessions: one row per sign-in (the cookie holds a random token; the row its SHA-256), with the CSRF token,
  when it was made and last used, and when it was revoked (logout, password change, an administrator);
- sign_in_devices: browsers (or API clients) that signed in as a user before (the device cookie holds a random
  token, the row its SHA-256). Failed sign-ins from a known device count against that device only, so an
  attacker guessing a user's password elsewhere slows the attacker, not the user (OWASP's device cookies);
- appointment_slots: the 15-minute slots a confirmed visit covers, unique per department: two writers (two
  worker processes, the API and a FHIR import) cannot both confirm a visit in one slot -- the second
  transaction fails on the unique index, on SQLite and PostgreSQL alike;
- appointments.reference: an opaque reference for booking requests (ids are sequential). Existing rows get
  one made from their id and a random part.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),  # sha256 of the cookie's token
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("address", sa.String(64)),
    )
    op.create_index("ix_sessions_user", "sessions", ["user_id"])
    op.create_table(
        "sign_in_devices",
        sa.Column("id", sa.String(64), primary_key=True),  # sha256 of the device cookie's token
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sign_in_devices_user", "sign_in_devices", ["user_id"])
    op.create_table(
        "appointment_slots",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("department", sa.String(64), nullable=False),
        sa.Column("slot_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("appointment_id", sa.Integer(), sa.ForeignKey("appointments.id", ondelete="CASCADE"),
                  nullable=False),
        sa.UniqueConstraint("department", "slot_start", name="uq_appointment_slots"),
    )
    op.create_index("ix_appointment_slots_appointment", "appointment_slots", ["appointment_id"])
    op.add_column("appointments", sa.Column("reference", sa.String(32)))
    conn = op.get_bind()
    for (aid,) in conn.execute(sa.text("SELECT id FROM appointments")).fetchall():
        conn.execute(sa.text("UPDATE appointments SET reference = :r WHERE id = :i"),
                     {"r": f"A{aid}-{secrets.token_urlsafe(9)}", "i": aid})
    op.create_index("ix_appointments_reference", "appointments", ["reference"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_appointments_reference", "appointments")
    with op.batch_alter_table("appointments") as b:
        b.drop_column("reference")
    op.drop_index("ix_appointment_slots_appointment", "appointment_slots")
    op.drop_table("appointment_slots")
    op.drop_index("ix_sign_in_devices_user", "sign_in_devices")
    op.drop_table("sign_in_devices")
    op.drop_index("ix_sessions_user", "sessions")
    op.drop_table("sessions")
