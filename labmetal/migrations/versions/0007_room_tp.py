"""a room open for a TP template

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 19:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rooms') as batch:
        batch.add_column(sa.Column('tp_template_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('tp_started_by', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('tp_started_at', sa.DateTime(), nullable=True))
        batch.create_foreign_key('fk_rooms_tp_template', 'templates', ['tp_template_id'],
                                 ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('rooms') as batch:
        batch.drop_constraint('fk_rooms_tp_template', type_='foreignkey')
        batch.drop_column('tp_started_at')
        batch.drop_column('tp_started_by')
        batch.drop_column('tp_template_id')
