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
    # On a server without lz4 the migration leaves pglz: this test then says so and skips.
    import os

    import pytest
    from sqlalchemy import insert, text

    from mailgw.queue import now
    from mailgw.store.models import Inbound

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
            "(('inbound', 'raw'), ('outbox', 'raw'), ('attachments', 'data'))")).all())
        assert methods == {"inbound.raw": "l", "outbox.raw": "l", "attachments.data": "l"}
        # Compressible and large enough to be compressed (TOAST starts near 2 kB).
        raw = b"Subject: x\r\n\r\n" + os.urandom(16).hex().encode() * 4000
        conn.execute(insert(Inbound).values(
            raw=raw, size=len(raw), sha256="0" * 64, state="pending", received_at=now(),
            source="smtp",
            mail_from="a@example.org", rcpt_tos=["b@example.org"]))
        assert conn.execute(text(
            "SELECT pg_column_compression(raw) FROM inbound")).scalar_one() == "lz4"
    engine.dispose()
