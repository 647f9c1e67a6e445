"""The worker's per-batch writes (mailgw/batch.py, issue 8 session 4): ids taken first, events,
outbox and loop-protection rows inserted once per batch, loop counts kept per batch. What a
batch stores must be what message-by-message processing stored. Both stores."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw import process as process_mod
from mailgw.store import models as m
from tests.helpers import Harness, mail


def _harness(home, **config):  # type: ignore[no-untyped-def]
    if config:
        home.update_config(**config)
    return Harness(home)


def _auto_replies(hx: Harness) -> list[m.AutoReply]:
    with Session(hx.engine) as s:
        return list(s.scalars(select(m.AutoReply).order_by(m.AutoReply.id)))


def _event_types(hx: Harness, inbound_id: int) -> list[str]:
    with Session(hx.engine) as s:
        return list(s.scalars(select(m.Event.type).where(m.Event.inbound_id == inbound_id)
                              .order_by(m.Event.id)))


def test_loop_limits_count_the_mail_queued_earlier_in_the_same_batch(home):
    hx = _harness(home, loop_protection={"max_per_sender": 2})
    try:
        # Given four new requests from one address, stored in one batch
        ids = hx.put(*(mail(f"Request {i}", msgid=f"r{i}@c") for i in range(4)))
        assert hx.worker.run_batch() == 4
        # Then two are acknowledged and two hit the limit, counting the batch's own acks
        assert len(hx.outbox()) == 2 and len(_auto_replies(hx)) == 2
        hits = hx.events("rate_limit_hit")
        assert sorted(e.inbound_id for e in hits) == ids[2:]
        assert all("2 automatic mails to alice@customer.test" in e.data["reason"] for e in hits)
        # And the next batch counts what the first one stored
        [later] = hx.put(mail("Request 5", msgid="r5@c"))
        hx.drain()
        assert [e.inbound_id for e in hx.events("rate_limit_hit")].count(later) == 1
        assert len(hx.outbox()) == 2
    finally:
        hx.close()


def test_per_ticket_limit_counts_a_ticket_opened_in_the_same_batch(home):
    hx = _harness(home, loop_protection={"max_per_ticket": 1})
    try:
        first, reply = hx.put(mail("Broken", msgid="b1@c"),
                              mail("Re: Broken", msgid="b2@c", In_Reply_To="<b1@c>"))
        assert hx.worker.run_batch() == 2
        [t] = hx.tickets()
        assert hx.inbound(reply).ticket_id == t.id
        [hit] = hx.events("rate_limit_hit")
        assert hit.inbound_id == reply and "max_per_ticket 1" in hit.data["reason"]
        assert len(hx.outbox()) == 1
    finally:
        hx.close()


def test_a_reply_in_the_same_batch_threads_and_its_ack_is_led_by_the_tickets_first_message(home):
    hx = _harness(home)
    try:
        first, reply = hx.put(mail("VPN down", msgid="v1@c"),
                              mail("more", msgid="v2@c", References="<v1@c>"))
        assert hx.worker.run_batch() == 2
        [t] = hx.tickets()
        arts = hx.articles(t.id)
        inbound = [a for a in arts if a.direction == "in"]
        assert [a.threaded_by for a in inbound] == ["new_ticket", "references"]
        acks = [a for a in arts if a.direction == "out"]
        assert len(acks) == 2
        assert acks[1].in_reply_to == "v2@c"
        assert acks[1].references.split() == ["v1@c", "v2@c"]
        # Ids follow the order the rows were made in: article, its ack, the next article...
        assert [a.inbound_id for a in arts] == [first, None, reply, None]
    finally:
        hx.close()


def test_a_messages_events_read_in_the_order_they_were_made(home):
    hx = _harness(home)
    try:
        ids = hx.put(mail("One", msgid="o1@c"), mail("Two", msgid="o2@c", sender="bob@c.test"))
        assert hx.worker.run_batch() == 2
        for iid in ids:
            types = _event_types(hx, iid)
            assert types.index("ticket_created") < types.index("article_received") \
                < types.index("auto_response_queued"), types
        # and the second message's events all come after the first's
        with Session(hx.engine) as s:
            by_inbound = s.execute(select(m.Event.inbound_id).order_by(m.Event.id)).scalars().all()
        assert by_inbound == sorted(by_inbound)
    finally:
        hx.close()


def test_a_message_rolled_back_in_its_savepoint_leaves_no_queued_rows_or_counts(home, monkeypatch):
    hx = _harness(home, loop_protection={"max_per_sender": 2})
    real = process_mod.notify_agents

    def notify(session, settings, renderer, row, ticket, article, mail_, **kw):  # type: ignore[no-untyped-def]
        # Fails after the message's events, acknowledgement and loop count were queued
        if "poison" in (mail_.subject or ""):
            raise RuntimeError("template exploded")
        return real(session, settings, renderer, row, ticket, article, mail_, **kw)

    monkeypatch.setattr(process_mod, "notify_agents", notify)
    try:
        ids = hx.put(mail("good 1", msgid="g1@c"), mail("poison", msgid="p@c"),
                     mail("good 2", msgid="g2@c"))
        assert hx.worker.run_batch() == 3
        assert [hx.inbound(i).state for i in ids] == ["done", "quarantined", "done"]
        assert _event_types(hx, ids[1]) == ["quarantined"]
        # The poison's ack was taken back with it: the second good one is still under the
        # limit of two, and only what was committed is in the store
        assert len(hx.outbox()) == 2 and len(_auto_replies(hx)) == 2
        assert hx.events("rate_limit_hit") == []
        assert len(hx.tickets()) == 2
        assert {o.article_id for o in hx.outbox()} == {
            a.id for a in hx.articles() if a.direction == "out"}
    finally:
        hx.close()


def test_ids_continue_after_the_stored_rows_across_batches(home):
    hx = _harness(home)
    try:
        hx.put(mail("A", msgid="a@c"))
        hx.drain()
        hx.put(mail("B", msgid="b@c", sender="bob@c.test"), mail("C", msgid="c@c",
                                                                   sender="carol@c.test"))
        hx.drain()
        tickets = hx.tickets()
        assert len(tickets) == 3 and len({t.id for t in tickets}) == 3
        for t in tickets:
            assert t.number.endswith(str(t.id).rjust(5, "0"))
        out = hx.outbox()
        assert [o.id for o in out] == sorted(o.id for o in out) and len(out) == 3
        # Each ack names its own article; each event its own inbound row
        arts = {a.id: a for a in hx.articles()}
        assert all(arts[o.article_id].direction == "out" for o in out)
    finally:
        hx.close()


def _with_attachment(subject: str, msgid: str, sender: str, name: str, data: bytes) -> bytes:
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "support@example.com", subject
    msg["Message-ID"] = f"<{msgid}>"
    msg.set_content("see attached")
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes()


def test_attachments_queued_to_the_batchs_end_name_their_own_articles(home):
    hx = _harness(home)
    try:
        ids = hx.put(_with_attachment("one", "a1@c", "alice@c.test", "a.bin", b"A" * 5000),
                     mail("no attachment", msgid="n@c", sender="bob@c.test"),
                     _with_attachment("two", "a2@c", "carol@c.test", "b.bin", bytes(range(256))))
        assert hx.worker.run_batch() == 3
        with Session(hx.engine) as s:
            rows = s.execute(select(m.Attachment.article_id, m.Attachment.filename,
                                    m.Attachment.data).order_by(m.Attachment.id)).all()
        by_inbound = {hx.inbound(i).article_id: i for i in ids}
        assert [(by_inbound[r.article_id], r.filename, r.data) for r in rows] == [
            (ids[0], "a.bin", b"A" * 5000), (ids[2], "b.bin", bytes(range(256)))]
    finally:
        hx.close()


def test_agent_notifications_in_one_batch_lead_with_the_tickets_first_message(home):
    from email import message_from_bytes

    data = home.config()
    data["agents"] = [{"name": "alice", "addresses": ["alice@agents.test"],
                       "queues": ["support"]}]
    home.write_config(data)
    hx = Harness(home)
    try:
        hx.put(mail("Printer", msgid="p1@c"), mail("Re: Printer", msgid="p2@c",
                                                   In_Reply_To="<p1@c>", References="<p1@c>"))
        assert hx.worker.run_batch() == 2
        notes = [message_from_bytes(o.raw) for o in hx.outbox()
                 if o.rcpt_tos == ["alice@agents.test"]]
        assert [n["In-Reply-To"] for n in notes] == ["<p1@c>", "<p2@c>"]
        assert all(n["References"].split()[0] == "<p1@c>" for n in notes)
        # each notification is an internal article of the one ticket, named by its outbox row
        [t] = hx.tickets()
        arts = {a.id: a for a in hx.articles(t.id)}
        for o in hx.outbox():
            assert arts[o.article_id].to_addrs == o.rcpt_tos[0]
    finally:
        hx.close()
