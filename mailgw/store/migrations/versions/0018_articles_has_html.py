"""articles.has_html: the HTML body is sanitised when first needed (decision 32)

An article stored from now on keeps its HTML part only in the raw mail (inbound.raw) and is
marked has_html; body_html becomes a cache that mailgw.mail.sanitize.article_html fills.
Articles stored before have their sanitised HTML in body_html already and keep has_html
false: no rows are rewritten (an UPDATE of every article with HTML would rewrite half a
large store, and their index entries on PostgreSQL, at the gateway's start).

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-27 08:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN with a constant default on both stores: batch mode with
    # ``sa.false()`` made Alembic copy the whole articles table on SQLite (20 s and twice the
    # file for 200k articles, at the gateway's start; review, session 6). '0' is false to
    # SQLite and to PostgreSQL's boolean input alike.
    op.add_column('articles', sa.Column('has_html', sa.Boolean(), server_default='0',
                                        nullable=False))


def downgrade() -> None:
    # Articles whose HTML was never shown lose nothing: it is still in inbound.raw, but
    # code before 0018 reads body_html only and will not show it.
    with op.batch_alter_table('articles', schema=None) as batch_op:
        batch_op.drop_column('has_html')
