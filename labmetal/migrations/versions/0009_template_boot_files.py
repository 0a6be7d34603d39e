"""a template version's own boot files, for Secure Boot seats' diskless sessions

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 08:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('template_versions') as batch:
        batch.add_column(sa.Column('boot_kernel', sa.String(length=36), nullable=True))
        batch.add_column(sa.Column('boot_initrd', sa.String(length=36), nullable=True))
        batch.add_column(sa.Column('boot_root_uuid', sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('template_versions') as batch:
        batch.drop_column('boot_root_uuid')
        batch.drop_column('boot_initrd')
        batch.drop_column('boot_kernel')
