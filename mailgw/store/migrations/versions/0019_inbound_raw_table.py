"""inbound_raw: the raw mail in a table of its own, out of the inbound row (decision 35)

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-27 09:40:00

The worker updates an inbound row twice (the claim's lease, then "done"); on SQLite each
UPDATE rewrote the whole record, the message included (SQLite keeps a large value in the
row's overflow pages and writes them all again): ~71 KB of WAL and ~0.15 ms of CPU a message
under the one write lock (bench/RESULTS.md, issue 8 session 6). The raw bytes now live in
``inbound_raw (inbound_id PK -> inbound.id, raw)``, inserted with the row in the same
transaction and never updated. PostgreSQL (whose TOAST kept the bytes out of the row already)
gets the same schema, so both stores run the same code; ``raw`` there is compressed with lz4
as 0016 set for ``inbound.raw`` (when the server has it).

Upgrade: create the table, copy every row's raw into it (one INSERT ... SELECT), drop
``inbound.raw``. What it costs on a big store:

- SQLite: the copy writes every message again, and ``ALTER TABLE ... DROP COLUMN`` (SQLite
  3.35+) then rewrites every inbound row, reading each message's overflow pages: roughly
  the store's mail read twice and written once, all in one transaction, so the WAL grows by
  the size of the mail (and is checkpointed after). The old pages go to the free list: the
  file does not shrink (``VACUUM`` gives the space back, offline). Measured on the loaded
  2-core test machine: 10,000 messages of 28 KB (280 MB of mail) in 7.6 s, the file
  288 -> 575 MB and the WAL 577 MB until its next checkpoint (bench/RESULTS.md, issue 8
  session 6): expect about 3 s per 100 MB of mail and have free disk for twice the mail.
  Not Alembic's batch mode: that rebuilds ``inbound`` (CREATE, copy, DROP, RENAME) and, with
  ``PRAGMA foreign_keys=ON`` (mailgw's connections), dropping the old table fails on the
  new foreign key from ``inbound_raw``; the native DROP COLUMN changes the rows in place.
  A later migration that rebuilds ``inbound`` on SQLite must turn foreign keys off for it.
- PostgreSQL: the copy reads and writes every message once (the same 280 MB: 2.6 s);
  DROP COLUMN only marks the column dropped: the old TOAST data is freed when the rows are
  rewritten (a done row never is) or by ``VACUUM FULL inbound``.

Downgrade moves the bytes back into ``inbound.raw`` (added as the last column; SQLite
needs a default for a NOT NULL column added so: ``x''``, never used) and drops the table.
"""
import logging

from alembic import op
import sqlalchemy as sa


revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def _lz4_available(bind) -> bool:  # type: ignore[no-untyped-def]
    return bool(bind.exec_driver_sql(
        "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
        "AND 'lz4' = ANY(enumvals)").first())


def upgrade() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    op.create_table(
        'inbound_raw',
        sa.Column('inbound_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  autoincrement=False, nullable=False),
        sa.Column('raw', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['inbound_id'], ['inbound.id'],
                                name=op.f('fk_inbound_raw_inbound_id_inbound')),
        sa.PrimaryKeyConstraint('inbound_id', name=op.f('pk_inbound_raw')),
    )
    if pg and _lz4_available(bind):
        op.execute("ALTER TABLE inbound_raw ALTER COLUMN raw SET COMPRESSION lz4")
    op.execute("INSERT INTO inbound_raw (inbound_id, raw) SELECT id, raw FROM inbound "
               "ORDER BY id")
    if pg:
        op.drop_column('inbound', 'raw')
    else:
        # In place (SQLite 3.35+), not batch mode: see the docstring.
        op.execute("ALTER TABLE inbound DROP COLUMN raw")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE inbound ADD COLUMN raw bytea")
        if _lz4_available(bind):
            op.execute("ALTER TABLE inbound ALTER COLUMN raw SET COMPRESSION lz4")
        op.execute("UPDATE inbound SET raw = r.raw FROM inbound_raw r WHERE r.inbound_id = inbound.id")
        op.execute("ALTER TABLE inbound ALTER COLUMN raw SET NOT NULL")
    else:
        op.execute("ALTER TABLE inbound ADD COLUMN raw BLOB NOT NULL DEFAULT x''")
        op.execute("UPDATE inbound SET raw = (SELECT r.raw FROM inbound_raw r "
                   "WHERE r.inbound_id = inbound.id)")
    op.drop_table('inbound_raw')
