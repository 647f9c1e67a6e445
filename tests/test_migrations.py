"""The Alembic migrations create exactly the schema the models declare, on both stores."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mailgw.store.db import SCHEMA_REVISION, current_revision, head_revision, make_engine, migrate
from mailgw.store.models import Base


def test_migrations_match_models(store_url):
    engine = make_engine(store_url)
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_schema_revision_constant_is_the_alembic_head(store_url):
    # mailgw checks the schema on every start without importing Alembic; the constant it
    # compares with must be the real head.
    assert SCHEMA_REVISION == head_revision()
    engine = make_engine(store_url)
    assert current_revision(engine) is None
    migrate(engine)
    migrate(engine)  # a second run is a no-op
    assert current_revision(engine) == SCHEMA_REVISION
    engine.dispose()


def test_postgresql_raw_mail_is_compressed_with_lz4(store_url):
    # Migration 0016: the big bytea columns use lz4 (less server CPU in the commit the
    # intake and the worker wait for); a value written afterwards records lz4 as its method.
    # Migration 0019 moved inbound.raw to inbound_raw.raw, with lz4 too.
    # On a server without lz4 the migration leaves pglz: this test then says so and skips.
    import os

    import pytest
    from sqlalchemy import text

    from mailgw.queue import now, put_many
    from mailgw.types import Envelope

    if not store_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite stores blobs uncompressed")
    engine = make_engine(store_url)
    migrate(engine)
    with engine.begin() as conn:
        if not conn.exec_driver_sql(
                "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
                "AND 'lz4' = ANY(enumvals)").first():
            pytest.skip("this PostgreSQL server has no lz4")
        methods = dict(conn.execute(text(
            "SELECT c.relname || '.' || a.attname, a.attcompression FROM pg_attribute a "
            "JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relnamespace = current_schema()::regnamespace "
            "AND (c.relname, a.attname) IN "
            "(('inbound_raw', 'raw'), ('outbox', 'raw'), ('attachments', 'data'))")).all())
        assert methods == {"inbound_raw.raw": "l", "outbox.raw": "l", "attachments.data": "l"}
        # Compressible and large enough to be compressed (TOAST starts near 2 kB).
        raw = b"Subject: x\r\n\r\n" + os.urandom(16).hex().encode() * 4000
    put_many(engine, [Envelope(raw=raw, mail_from="a@example.org", rcpt_tos=("b@example.org",),
                               source="smtp", received_at=now())])
    with engine.connect() as conn:
        assert conn.execute(text(
            "SELECT pg_column_compression(raw) FROM inbound_raw")).scalar_one() == "lz4"
    engine.dispose()


def test_migration_0019_moves_raw_mail_to_its_own_table_and_back(store_url):
    # Migration 0019 (decision 35): rows stored before it keep their exact bytes, read through
    # inbound_raw afterwards (the worker's read, a large one in pieces on PostgreSQL, and
    # Inbound.raw) and the rows take UPDATEs as before; the downgrade puts them back.
    import hashlib

    import sqlalchemy as sa
    from alembic import command
    from sqlalchemy.orm import Session

    from mailgw.queue import now
    from mailgw.store import models as m
    from mailgw.store.db import _alembic_config
    from mailgw.worker import PG_PIECE, Worker

    engine = make_engine(store_url)
    cfg = _alembic_config(engine)
    command.upgrade(cfg, "0018")
    inbound = sa.table("inbound", *(sa.column(c) for c in (
        "received_at", "source", "size", "sha256", "state", "attempts")),
        sa.column("raw", sa.LargeBinary), sa.column("rcpt_tos", sa.JSON))
    raws = [b"Subject: one\r\nMessage-ID: <one@c>\r\n\r\nfirst\r\n",
            bytes(range(256)) * 4,  # every byte value
            b"Subject: big\r\n\r\n" + b"0123456789abcde\n" * (PG_PIECE // 16 + 4096),
            b""]
    with engine.begin() as c:
        c.execute(sa.insert(inbound), [
            {"received_at": now(), "source": "smtp", "rcpt_tos": ["support@example.com"],
             "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "raw": raw,
             "state": "done" if i else "pending", "attempts": 0}
            for i, raw in enumerate(raws)])
        ids = c.exec_driver_sql("SELECT id FROM inbound ORDER BY id").scalars().all()

    command.upgrade(cfg, "0019")
    assert current_revision(engine) == "0019"
    with engine.connect() as c:
        assert "raw" not in {col["name"] for col in sa.inspect(c).get_columns("inbound")}
        assert dict(c.execute(sa.select(m.InboundRaw.inbound_id, m.InboundRaw.raw)).all()) \
            == dict(zip(ids, raws, strict=True))
    worker = Worker.__new__(Worker)  # its read of a batch's raw mail alone
    worker._pg = engine.dialect.name == "postgresql"
    with Session(engine) as s:
        assert dict(worker._raws(s, ids)) == dict(zip(ids, raws, strict=True))
        assert [s.get(m.Inbound, i).raw for i in ids] == raws
    with engine.begin() as c:  # the rows keep working: a claim's UPDATE, as the worker's
        c.execute(sa.update(m.Inbound).where(m.Inbound.id == ids[0]).values(attempts=1))
        c.execute(sa.update(m.Inbound).where(m.Inbound.id == ids[0]).values(attempts=0))

    command.downgrade(cfg, "0018")
    assert current_revision(engine) == "0018"
    with engine.connect() as c:
        assert "inbound_raw" not in sa.inspect(c).get_table_names()
        assert c.exec_driver_sql("SELECT raw FROM inbound ORDER BY id").scalars().all() \
            == raws
    command.upgrade(cfg, "head")
    with Session(engine) as s:
        assert [s.get(m.Inbound, i).raw for i in ids] == raws
    engine.dispose()
