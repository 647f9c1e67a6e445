"""The rows a busy sweep writes hang together (mailgw/sla/notices.store; the sweep's claim
reads each ticket's first Message-ID): ids taken before the INSERTs, each outbox row with its own article, VERP naming it, the notice and the
event pointing at both, every notice replying to its ticket's first message; and rows
inserted the ordinary way afterwards get new ids. SQLite and PostgreSQL."""

from __future__ import annotations

from email import message_from_bytes

from sqlalchemy.orm import Session

from mailgw.outbound.verp import signer_for
from mailgw.store import models as m
from tests.test_sla_sweep import MIN, T0, add_clock, add_ticket, env, std  # noqa: F401


def test_batched_notices_point_at_their_own_rows(env):  # type: ignore[no-untyped-def]  # noqa: F811
    e = env([std(levels=[{"percent": 50}, {"percent": 75}, {"percent": 100,
                                                            "notify": ["owner", "queue_agents"]}])])
    with Session(e.engine) as s, s.begin():
        for n in range(1, 6):
            t = add_ticket(s, n, owner="alice" if n % 2 else "carol")
            # a later customer message: the notice must still reply to the first one
            s.add(m.Article(ticket_id=t.id, direction="in", sender_type="customer",
                            from_addr=t.customer, subject="again",
                            message_id=f"second-{n}@customer.test", threaded_by="reply",
                            created_at=T0 + MIN))
            add_clock(s, t, first_percent=50)
    # batches of 2: several statements' worth of allocated ids, three levels per clock
    result = e.sweeper(batch_size=2).sweep(T0 + 90 * MIN)
    assert len(result.fired) == 15
    articles = {a.id: a for a in e.all(m.Article)}
    tickets = {t.id: t for t in e.all(m.Ticket)}
    outbox = e.all(m.Outbox)
    assert len(outbox) == 15 and len({o.article_id for o in outbox}) == 15
    signer = signer_for(e.settings)
    for o in outbox:
        art = articles[o.article_id]
        assert (art.ticket_id, art.message_id, art.sender_type) == (
            o.ticket_id, o.message_id, "system")
        assert signer.verp_article(o.mail_from) == o.article_id
        mail = message_from_bytes(o.raw)
        n = int(tickets[o.ticket_id].number[-5:])
        assert mail["In-Reply-To"] == f"<first-{n}@customer.test>"
        assert mail["Message-ID"] == f"<{o.message_id}>"
    by_article = {o.article_id: o for o in outbox}
    notices = e.all(m.SlaNotice)
    assert len(notices) == 15
    for notice in notices:
        o = by_article[notice.actions["article_id"]]
        assert notice.actions["outbox_id"] == o.id and o.ticket_id == notice.ticket_id
    events = [ev for ev in e.all(m.Event) if ev.type in ("sla_warning", "sla_breach")]
    assert sorted(ev.article_id for ev in events) == sorted(by_article)
    # ordinary inserts after the sweep's own ids: no collision, ids go on
    with Session(e.engine) as s, s.begin():
        a = m.Article(ticket_id=outbox[0].ticket_id, direction="in", sender_type="customer",
                      from_addr="x@customer.test", subject="later", threaded_by="reply",
                      created_at=T0 + 99 * MIN)
        s.add(a)
        s.flush()
        o = m.Outbox(ticket_id=a.ticket_id, article_id=a.id, mail_from="x@example.com",
                     rcpt_tos=["y@example.com"], message_id="later@x", raw=b"x",
                     next_attempt_at=T0, created_at=T0)
        s.add(o)
        s.flush()
        assert a.id > max(articles) and o.id > max(x.id for x in outbox)
