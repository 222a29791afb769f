"""telemetry input pack column

Windows now arrive as telemetry frames: JSON plus the input sketch pack as raw bytes. The
pack is stored in its own binary column, so the drift tiler reads it without a base64
decode or a JSON parse of the bulk of the window. On PostgreSQL the column is stored
uncompressed (STORAGE EXTERNAL).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 01:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("telemetryrecord", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_pack", sa.LargeBinary(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        # out of line but not compressed: pglz gains little on float sketches and costs
        # the server CPU on every insert (EXTENDED, bytea's default, tries it on each)
        op.execute("ALTER TABLE telemetryrecord ALTER COLUMN input_pack SET STORAGE EXTERNAL")


def downgrade() -> None:
    with op.batch_alter_table("telemetryrecord", schema=None) as batch_op:
        batch_op.drop_column("input_pack")
