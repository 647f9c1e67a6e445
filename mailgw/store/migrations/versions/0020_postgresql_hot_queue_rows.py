"""PostgreSQL: inbound pages keep room for the claim's update; the state index only for quarantine

Revision ID: 0020
Revises: 0019
Create Date: 2026-11-27 12:30:00

Each inbound row is updated twice by the worker: the claim (``attempts``, ``claimed_until``,
``claimed_by``) and "done" (``state``, ``processed_at``, ``ticket_id``, ``article_id``). With
full pages (fillfactor 100) the claim's new row version went to another page, with an entry
in each of the five indexes of ``inbound``, and the whole row in the WAL. With half of each
page free the claim of a batch is a HOT update (same page, no index entries, only the changed
bytes logged); "done" changes ``state``, which the partial index ``ix_inbound_pending``
depends on, so it cannot be HOT, but it finds room on the same page once the claim's old
versions are pruned. ``inbound`` rows are small (~260 bytes; the mail is in ``inbound_raw``)
and the table was no bigger after the benchmark's 1,000 messages (592-616 kB against 712),
since an update no longer leaves its old version on a full page.

``ix_inbound_state`` on ``state`` got an entry for every row version (three a message) and
served no query of the worker, the intake or the sender on PostgreSQL (the claim, the
pending count and the dead-claim release use ``ix_inbound_pending``; the redelivery check
``ix_inbound_sha256``); only ``mailgw quarantine list`` looks for a state, "quarantined". On
PostgreSQL it is now partial, for that state only (empty in a healthy store). SQLite keeps
the full index: its claim plan uses it (bench/RESULTS.md, issue 8 session 6).

Measured (bench/RESULTS.md, issue 8 session 7): the claim's UPDATE 0.74 -> 0.35 ms of server
CPU a batch; WAL of an end-to-end run of 1,000 messages 61 -> 58 MB, b-tree leaf inserts 67
-> 59 a message. The setting applies to pages written from now on (an existing store gets it
for its old rows after a rewrite, optional); the index is rebuilt by the migration: a scan
of ``inbound`` during which other nodes' intake waits (0.3 s at a million rows on the test
machine; the downgrade 0.65 s).
"""
from alembic import op


revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

INBOUND_FILLFACTOR = 50


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE inbound SET (fillfactor = {INBOUND_FILLFACTOR})")
    op.execute("DROP INDEX ix_inbound_state")
    op.execute("CREATE INDEX ix_inbound_state ON inbound (state) WHERE state = 'quarantined'")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE inbound RESET (fillfactor)")
    op.execute("DROP INDEX ix_inbound_state")
    op.execute("CREATE INDEX ix_inbound_state ON inbound (state)")
