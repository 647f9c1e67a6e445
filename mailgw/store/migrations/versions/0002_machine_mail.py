"""machine mail: article class, visible/quoted/signature text, delivery error; auto_replies

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 21:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('articles', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mail_class', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('visible_text', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('signature_text', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('quoted_text', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('delivery_error', sa.Text(), nullable=True))
    op.create_table('auto_replies',
    sa.Column('id', BigId, nullable=False),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('ticket_id', BigId, nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_auto_replies'))
    )
    with op.batch_alter_table('auto_replies', schema=None) as batch_op:
        batch_op.create_index('ix_auto_replies_recipient_created_at', ['recipient', 'created_at'], unique=False)
        batch_op.create_index('ix_auto_replies_ticket_id_created_at', ['ticket_id', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('auto_replies', schema=None) as batch_op:
        batch_op.drop_index('ix_auto_replies_ticket_id_created_at')
        batch_op.drop_index('ix_auto_replies_recipient_created_at')
    op.drop_table('auto_replies')
    with op.batch_alter_table('articles', schema=None) as batch_op:
        batch_op.drop_column('delivery_error')
        batch_op.drop_column('quoted_text')
        batch_op.drop_column('signature_text')
        batch_op.drop_column('visible_text')
        batch_op.drop_column('mail_class')
