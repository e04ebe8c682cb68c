"""Pause and resume of fine-tuning jobs: the columns of a job's pause.

``pause_requested_at``: a pause asked of a running job (its run is told through ``PAUSE`` in the run directory and
stops at its next step with a checkpoint); ``paused_from``: the state a paused job left (``validating_files``,
``queued`` or ``running``), which ``resume`` returns it to (``running`` resumes as ``queued``); ``paused_at``: when
it became paused; ``paused_s``: the seconds a started job spent paused (not counted against its wall-clock limit);
``pauses``: its runs that ended by a pause (not counted against ``max_job_attempts``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 13:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pause_requested_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('paused_from', sa.String(length=24), nullable=True))
        batch_op.add_column(sa.Column('paused_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('paused_s', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('pauses', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    for column in ('pauses', 'paused_s', 'paused_at', 'paused_from', 'pause_requested_at'):
        op.drop_column('jobs', column)  # plain DROP COLUMN (SQLite >= 3.35), no batch table copy
