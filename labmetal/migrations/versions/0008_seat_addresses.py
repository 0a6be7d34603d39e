"""the addresses seats hold: DHCP leases, and the address a deploy agent is bound to

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 04:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'dhcp_leases',
        sa.Column('mac', sa.String(length=17), nullable=False),
        sa.Column('address', sa.String(length=45), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=True),
        sa.Column('conductor', sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint('mac', 'address'))
    with op.batch_alter_table('nodes') as batch:
        batch.add_column(sa.Column('agent_address', sa.String(length=45), nullable=True))
        batch.add_column(sa.Column('agent_alarm', sa.Text(), nullable=True))
    with op.batch_alter_table('student_sessions') as batch:
        batch.add_column(sa.Column('seat_address', sa.String(length=45), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('student_sessions') as batch:
        batch.drop_column('seat_address')
    with op.batch_alter_table('nodes') as batch:
        batch.drop_column('agent_alarm')
        batch.drop_column('agent_address')
    op.drop_table('dhcp_leases')
