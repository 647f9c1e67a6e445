"""PostgreSQL: tickets pages keep room for HOT updates (issue 8, store size)

Revision ID: 0010
Revises: 0008
Create Date: 2026-11-27 03:10:00

A follow-up to an old ticket updates the ticket row (``updated_at``, sometimes ``state``).
With full pages (fillfactor 100, the default) the new row version goes to another page and
every index of ``tickets`` gets an entry for it: six index leaves at random places, read,
dirtied and (first touch after a checkpoint) written whole to the WAL. With free room on the
page, an update that changes no indexed column is a heap-only tuple (HOT) update: the same
page, no index entries. At 1M tickets that was the statement whose cost grew most with the
store (bench/RESULTS.md, issue 8 session 4).

The setting applies to pages written from now on; an existing store gets it for its old
tickets after a rewrite (``VACUUM FULL tickets`` or pg_repack), which is optional. SQLite
has no such setting (it rewrites the row in place).
"""
from alembic import op


revision = '0010'
down_revision = '0008'
branch_labels = None
depends_on = None

TICKETS_FILLFACTOR = 85


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE tickets SET (fillfactor = {TICKETS_FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE tickets RESET (fillfactor)")
