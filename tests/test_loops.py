"""Specs for mailgw.loops: per-address and per-ticket limits on automatic mail, in the store."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw import loops
from mailgw.queue import now
from mailgw.settings import LoopProtection
from mailgw.store import models as m
from mailgw.store.db import make_engine, migrate
from tests.helpers import Harness, mail


def test_limits_per_address_and_per_ticket_in_a_sliding_window(store_url):
    engine = make_engine(store_url)
    migrate(engine)
    cfg = LoopProtection(max_per_sender=3, max_per_ticket=2, window_hours=24)
    try:
        with Session(engine) as s, s.begin():
            # Given two automatic mails to alice on ticket 1, and an old one outside the window
            loops.record(s, "Alice@Customer.test", 1)
            loops.record(s, "alice@customer.test", 1)
            s.add(m.AutoReply(recipient="alice@customer.test", ticket_id=2,
                              created_at=now() - timedelta(hours=25)))
        with Session(engine) as s:
            # Then ticket 1 is at its limit, whoever writes on it
            reason = loops.limit_reason(s, cfg, "bob@customer.test", 1)
            assert reason and "max_per_ticket 2" in reason
            # And alice may get one more on another ticket (the old one does not count)
            assert loops.limit_reason(s, cfg, "alice@customer.test", 3) is None
        with Session(engine) as s, s.begin():
            loops.record(s, "alice@customer.test", 3)
        with Session(engine) as s:
            reason = loops.limit_reason(s, cfg, "ALICE@customer.test", 4)
            assert reason and "3 automatic mails to alice@customer.test" in reason
            # A limit of 0 sends nothing at all
            assert loops.limit_reason(s, LoopProtection(max_per_sender=0), "x@y.test", None)
        # And pruning removes only the rows outside the window
        assert loops.prune(engine, cfg) == 1
        with Session(engine) as s:
            assert len(list(s.scalars(select(m.AutoReply.id)))) == 3
    finally:
        engine.dispose()


def test_worker_stops_acknowledging_at_the_limit_and_records_why(home):
    # Given one acknowledgement per ticket a day at most
    home.update_config(loop_protection={"max_per_ticket": 1})
    h = Harness(home)
    try:
        # When a customer opens a ticket and writes twice more on it
        h.put(mail("Broken", msgid="m1@customer.test"))
        h.drain()
        h.put(mail("Re: Broken", msgid="m2@customer.test", In_Reply_To="<m1@customer.test>"))
        h.put(mail("Re: Broken", msgid="m3@customer.test", In_Reply_To="<m1@customer.test>"))
        h.drain()
        # Then one acknowledgement was queued, and the others were suppressed with the reason
        assert len(h.tickets()) == 1
        assert len(h.outbox()) == 1
        hits = h.events("rate_limit_hit")
        assert len(hits) == 2 and all("max_per_ticket 1" in e.data["reason"] for e in hits)
        suppressed = h.events("auto_response_suppressed")
        assert len(suppressed) == 2 and "rate limit" in suppressed[0].data["reason"]
        # And the envelope sender of the acknowledgement is a VERP address naming its article
        [out] = h.outbox()
        assert out.mail_from.startswith("bounces+") and out.mail_from.endswith("@example.com")
    finally:
        h.close()
