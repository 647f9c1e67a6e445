"""inbound.message_id (indexed) and inbound.held_since: a reply waits for its original

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-27 08:45:00

``message_id`` is the bare Message-ID of the inbound message, taken from its header block
at intake (``mailgw.intake.pipe.message_id_of``), so the worker can tell that a reply whose
original is not on a ticket yet refers to a message still in the queue (pending, or claimed
by another worker) and hold the reply back until that message is stored
(docs/architecture.md, decision 31). ``held_since`` is when the worker first held the row
back for that reason; a row is held at most ``worker.HOLD_MAX`` seconds from then.

Rows already stored get no ``message_id`` except the pending ones, which are filled in from
their header block here (a queue is small; the done rows are never looked up by it).
"""
from alembic import op
import sqlalchemy as sa


revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inbound', schema=None) as batch_op:
        batch_op.add_column(sa.Column('message_id', sa.String(length=998), nullable=True))
        batch_op.add_column(sa.Column('held_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_inbound_message_id', ['message_id'], unique=False)
    from mailgw.intake.pipe import message_id_of

    bind = op.get_bind()
    inbound = sa.table('inbound', sa.column('id'), sa.column('raw', sa.LargeBinary),
                       sa.column('state'), sa.column('message_id'))
    rows = bind.execute(sa.select(inbound.c.id).where(inbound.c.state == 'pending')).scalars().all()
    for inbound_id in rows:
        head = bind.execute(sa.select(sa.func.substr(inbound.c.raw, 1, 256 * 1024))
                            .where(inbound.c.id == inbound_id)).scalar()
        mid = message_id_of(bytes(head)) if head is not None else None
        if mid is not None:
            bind.execute(sa.update(inbound).where(inbound.c.id == inbound_id)
                         .values(message_id=mid))


def downgrade() -> None:
    with op.batch_alter_table('inbound', schema=None) as batch_op:
        batch_op.drop_index('ix_inbound_message_id')
        batch_op.drop_column('held_since')
        batch_op.drop_column('message_id')
