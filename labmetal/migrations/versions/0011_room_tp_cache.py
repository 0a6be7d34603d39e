"""a room job that puts a TP's template version in its seats' caches (a room opening a TP)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 18:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('room_jobs') as batch:
        batch.add_column(sa.Column('template_version_id', sa.Integer(), nullable=True))
        batch.create_foreign_key('fk_room_jobs_template_version', 'template_versions',
                                 ['template_version_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('room_jobs') as batch:
        batch.drop_constraint('fk_room_jobs_template_version', type_='foreignkey')
        batch.drop_column('template_version_id')
