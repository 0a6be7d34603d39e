"""local-first sessions: seats' caches, a session's mode, a template version's local boot

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 14:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('templates') as batch:
        batch.add_column(sa.Column('session_mode', sa.String(length=8), nullable=False,
                                   server_default='auto'))
    with op.batch_alter_table('template_versions') as batch:
        batch.add_column(sa.Column('session_kernel', sa.String(length=36), nullable=True))
        batch.add_column(sa.Column('session_initramfs', sa.String(length=36), nullable=True))
        batch.add_column(sa.Column('root_offset', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('root_size', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('root_fstype', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('local_boot_error', sa.Text(), nullable=True))
    with op.batch_alter_table('student_sessions') as batch:
        batch.add_column(sa.Column('mode', sa.String(length=8), nullable=False,
                                   server_default='iscsi'))
        batch.add_column(sa.Column('synced_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('pending_save', sa.String(length=64), nullable=True))
    op.create_table(
        'seat_caches',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('node_id', sa.Integer(), nullable=False),
        sa.Column('cache_id', sa.String(length=32), nullable=True),
        sa.Column('start', sa.BigInteger(), nullable=True),
        sa.Column('size', sa.BigInteger(), nullable=True),
        sa.Column('origin_version_id', sa.Integer(), nullable=True),
        sa.Column('origin_sha256', sa.String(length=64), nullable=True),
        sa.Column('origin_complete', sa.Boolean(), nullable=False),
        sa.Column('overlay_session_id', sa.Integer(), nullable=True),
        sa.Column('overlay_uploaded', sa.Boolean(), nullable=False),
        sa.Column('chunk_sectors', sa.Integer(), nullable=True),
        sa.Column('token', sa.Text(), nullable=True),
        sa.Column('token_address', sa.String(length=45), nullable=True),
        sa.Column('reported_at', sa.DateTime(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['origin_version_id'], ['template_versions.id'],
                                ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['overlay_session_id'], ['student_sessions.id'],
                                ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('node_id'),
    )


def downgrade() -> None:
    op.drop_table('seat_caches')
    with op.batch_alter_table('student_sessions') as batch:
        batch.drop_column('pending_save')
        batch.drop_column('synced_at')
        batch.drop_column('mode')
    with op.batch_alter_table('template_versions') as batch:
        for column in ('local_boot_error', 'root_fstype', 'root_size', 'root_offset',
                       'session_initramfs', 'session_kernel'):
            batch.drop_column(column)
    with op.batch_alter_table('templates') as batch:
        batch.drop_column('session_mode')
