"""Public ids of job events and checkpoints that reveal nothing: ``job_events.ref``.

An event's id was ``ftevent-{pk}`` and a checkpoint's ``ftckpt-{pk}``, the table's global auto-increment key, so a
tenant could read from the gaps between its own ids how many events all other tenants' jobs wrote, and when. New
rows get a random ``ref`` (``secrets.token_hex(12)``); the rows already stored keep their ids (``ref`` = their
``pk`` in decimal), so the cursors and checkpoint ids clients hold stay valid. Ordering still uses ``pk``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 02:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('job_events', sa.Column('ref', sa.String(length=24), nullable=True))  # no SQLite table copy
    op.execute("UPDATE job_events SET ref = CAST(pk AS VARCHAR(24))")
    op.create_index('ix_job_events_ref', 'job_events', ['ref'], unique=True)


def downgrade() -> None:
    op.drop_index('ix_job_events_ref', table_name='job_events')
    op.drop_column('job_events', 'ref')  # plain DROP COLUMN (SQLite >= 3.35), no batch table copy
