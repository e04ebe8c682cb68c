"""Lineage of continued training: jobs.parent_model and models.parent_model.

``jobs.parent_model`` is the model id a job was asked to continue from (one of the tenant's ``ft:`` models, a
checkpoint id ``ftckpt-…`` or a checkpoint model ``ft:…:ckpt-step-N``); NULL for a job on a base model, whose
``jobs.model`` is then also what was requested. ``jobs.model`` always holds the base model the job trains on.
``models.parent_model`` copies it onto the model the job produced (``GET /v1/models/{id}``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_model', sa.String(length=512), nullable=True))
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_model', sa.String(length=512), nullable=True))


def downgrade() -> None:
    op.drop_column('models', 'parent_model')  # plain DROP COLUMN (SQLite >= 3.35), no batch table copy
    op.drop_column('jobs', 'parent_model')
