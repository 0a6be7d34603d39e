"""deploy agent fields

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 13:26:44.432907
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deploy_step', sa.JSON(), server_default='{}', nullable=False))
        batch_op.add_column(sa.Column('agent_url', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('agent_token', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('agent_token_given', sa.Boolean(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('agent_heartbeat_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('inventory', sa.JSON(), server_default='{}', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('inventory')
        batch_op.drop_column('agent_heartbeat_at')
        batch_op.drop_column('agent_token_given')
        batch_op.drop_column('agent_token')
        batch_op.drop_column('agent_url')
        batch_op.drop_column('deploy_step')

