"""Scheduler fencing: leases.epoch, the fencing token of a lease.

The epoch grows by one each time the lease changes hands (``repository.take_lease``); the scheduler renews its lease
only while holder *and* epoch are still its own (``repository.renew_lease``) at the start of every transaction it
writes in, so a leader that lost the lease mid-tick writes nothing once another process took over.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('epoch', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    op.drop_column('leases', 'epoch')  # plain DROP COLUMN (SQLite >= 3.35), no batch table copy
