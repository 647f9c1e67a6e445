"""Every message of ../shared/corpus goes through the worker without an unhandled exception:
each becomes a ticket article or a quarantine entry with a reason."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from mailgw.store import models as m
from tests.corpus import iter_corpus_messages
from tests.helpers import Harness


@pytest.mark.timeout(900)
def test_whole_corpus_through_the_worker(home):
    messages = list(iter_corpus_messages())  # skips with a reason when ../shared is absent
    assert len(messages) > 1000
    hx = Harness(home)
    ids = []
    for start in range(0, len(messages), 500):
        ids += hx.put(*[raw for _, raw in messages[start:start + 500]])
    hx.drain()
    with hx.engine.connect() as c:
        states = dict(c.execute(select(m.Inbound.state, func.count()).group_by(m.Inbound.state)).all())
        no_reason = c.scalar(select(func.count()).select_from(m.Inbound).where(
            m.Inbound.state == "quarantined", m.Inbound.error.is_(None)))
        unlinked = c.scalar(select(func.count()).select_from(m.Inbound).where(
            m.Inbound.state == "done", m.Inbound.article_id.is_(None)))
        dups = c.scalar(select(func.count()).select_from(m.Event).where(
            m.Event.type == "duplicate_ignored"))
        # Bounces of mail we never sent (and our own mail coming back) open no ticket: they
        # are recorded on the inbound row instead (docs/machine-mail.md).
        recorded_only = c.scalar(select(func.count()).select_from(m.Event).where(
            m.Event.type.in_(["bounce_untrusted", "own_mail_returned"])))
        quarantined = c.execute(select(m.Inbound.id, m.Inbound.error)
                                .where(m.Inbound.state == "quarantined")).all()
    hx.close()
    names = dict(zip(ids, (n for n, _ in messages), strict=True))
    assert states.get("pending", 0) == 0
    assert sum(states.values()) == len(messages)
    assert no_reason == 0
    # Every done message is linked to its article, except byte-identical duplicates in the
    # corpus and untrusted bounces (recorded, no ticket)
    assert recorded_only > 100
    assert unlinked == dups + recorded_only
    # The corpus is mail: only input that is not mail at all may be quarantined
    for iid, error in quarantined:
        assert error.startswith("not an email message"), (names[iid], error)
