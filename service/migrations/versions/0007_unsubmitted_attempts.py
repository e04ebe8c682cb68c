"""Attempts that never reached Ray: ``jobs.unsubmitted_attempts``.

The scheduler commits a job ``running`` (with its next submission id) before it submits it to Ray. A scheduler that
stops in between leaves a job that Ray says does not exist and whose run directory has no record of the submission
(``submissions/{id}.json``, written once Ray accepted it): that attempt never ran, so it is not counted against
``max_job_attempts`` (counted: ``attempt - pauses - unsubmitted_attempts``). The next launch takes the next
submission id, never the same one again: the stopped scheduler's submission may still land (it is then stopped).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 12:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('unsubmitted_attempts', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    op.drop_column('jobs', 'unsubmitted_attempts')  # plain DROP COLUMN (SQLite >= 3.35), no batch table copy
