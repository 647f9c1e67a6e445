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
