"""PostgreSQL: raw mail and attachments compressed with lz4, not pglz (issue 8, server CPU)

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-27 08:40:00

``inbound.raw``, ``outbox.raw`` and ``attachments.data`` hold whole messages and their parts:
most of what the store writes (28 MB for the benchmark's 1,000 messages). PostgreSQL
compresses such values when it moves them out of line (TOAST) with pglz by default, in the
server process, inside the commit the worker and the SMTP intake wait for: on the 2-core
machine the server spent 1.1 ms of CPU a message end to end, and with lz4 0.8 (smtp_bench,
2026-11-27; bench/RESULTS.md, issue 8 session 6). Inserting the benchmark corpus' raw
messages alone: pglz 0.43-0.52 ms of server CPU a message for 3 % less space (28.4 MB of
29.4: mail is mostly base64, which pglz barely shrinks), lz4 0.10-0.18 ms for 28.5 MB, no
compression 0.06-0.16 ms. lz4 keeps most of what compression is worth on plain-text mail
(the bulk of a store without attachments) at a fraction of pglz's CPU.

The setting applies to values written from now on; values already stored keep pglz and are
read as before (each value records its method). It needs PostgreSQL 14 or newer built with
lz4 (Debian's and the official images are); on a server without it the migration changes
nothing and says so in the log. SQLite stores blobs as they are.
"""
import logging

from alembic import op


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

COLUMNS = (("inbound", "raw"), ("outbox", "raw"), ("attachments", "data"))


def _lz4_available(bind) -> bool:  # type: ignore[no-untyped-def]
    return bool(bind.exec_driver_sql(
        "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
        "AND 'lz4' = ANY(enumvals)").first())


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if not _lz4_available(bind):
        log.warning("PostgreSQL without lz4 (older than 14, or built without it): raw mail "
                    "stays compressed with pglz")
        return
    for table, column in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or not _lz4_available(bind):
        return
    for table, column in COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION default")
