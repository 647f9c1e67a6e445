"""filters and assignment: ticket fields, article filter trace, round-robin cursors

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 21:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('assignment_cursors',
    sa.Column('queue', sa.String(length=64), nullable=False),
    sa.Column('last_agent', sa.String(length=320), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('queue', name=op.f('pk_assignment_cursors'))
    )
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('type', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('service', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('category', sa.String(length=200), nullable=True))
        # Existing tickets get empty tags and fields.
        batch_op.add_column(sa.Column('tags', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('custom_fields', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('company', sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column('urgency', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('impact', sa.String(length=16), nullable=True))
        batch_op.create_index('ix_tickets_owner_state', ['owner', 'state'], unique=False)
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.alter_column('tags', server_default=None)
        batch_op.alter_column('custom_fields', server_default=None)
    with op.batch_alter_table('articles', schema=None) as batch_op:
        batch_op.add_column(sa.Column('filter_trace', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('articles', schema=None) as batch_op:
        batch_op.drop_column('filter_trace')
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.drop_index('ix_tickets_owner_state')
        for col in ('impact', 'urgency', 'company', 'custom_fields', 'tags', 'category',
                    'service', 'type'):
            batch_op.drop_column(col)
    op.drop_table('assignment_cursors')
