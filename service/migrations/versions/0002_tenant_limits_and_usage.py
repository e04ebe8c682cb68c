"""Tenant caps and storage accounting: tenants.limits, tenants.used_bytes, jobs.stored_bytes, jobs.max_wall_clock_s.

Existing tenants start with ``used_bytes`` = the bytes of their uploaded files (purpose ``fine-tune``); run outputs
of jobs that ran before this revision are charged by the usage reconciliation (``service.usage.reconcile``,
``POST /v1/admin/tenants/{id}/usage/reconcile``), which lists their run directories.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('limits', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('used_bytes', sa.BigInteger(), nullable=False, server_default='0'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stored_bytes', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('max_wall_clock_s', sa.BigInteger(), nullable=True))
    op.execute("UPDATE tenants SET used_bytes = (SELECT COALESCE(SUM(files.bytes), 0) FROM files "
               "WHERE files.tenant_id = tenants.id AND files.purpose = 'fine-tune')")


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35 has it): a batch table copy would drop ``tenants`` and, with foreign keys
    # on, cascade to every tenant-owned row.
    for table, column in (('jobs', 'max_wall_clock_s'), ('jobs', 'stored_bytes'), ('tenants', 'used_bytes'),
                          ('tenants', 'limits')):
        op.drop_column(table, column)
