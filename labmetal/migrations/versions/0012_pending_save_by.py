"""who asked for a save point queued until a local session's seat uploads it

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 23:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('student_sessions') as batch:
        batch.add_column(sa.Column('pending_save_by', sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('student_sessions') as batch:
        batch.drop_column('pending_save_by')
