"""The worker on both stores: threading rules, closed-ticket policies, quarantine, duplicates."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from mailgw.store import models as m
from tests.helpers import Harness, mail


@pytest.fixture
def hx(home):  # type: ignore[no-untyped-def]
    h = Harness(home)
    yield h
    h.close()


def _set_policy(hx: Harness, policy: str) -> None:
    data = hx.home.config()
    data["queues"][0]["on_closed_reply"] = policy
    hx.home.write_config(data)
    hx.settings = hx.home.settings()


def _close(hx: Harness, ticket_id: int) -> None:
    [number] = [t.number for t in hx.tickets() if t.id == ticket_id]
    proc = hx.home.cli("tickets", "state", f"Ticket#{number}", "closed", check=True)
    assert b"new -> closed" in proc.stdout


def test_new_ticket_number_and_customer(hx):
    hx.put(mail("Hello", msgid="a1@c"))
    hx.drain()
    [t] = hx.tickets()
    assert t.number.startswith(t.created_at.strftime("%Y%m%d") + "10")
    assert t.number.endswith(str(t.id).rjust(5, "0"))
    assert (t.customer, t.state, t.queue) == ("alice@customer.test", "new", "support")
    [ev] = hx.events("article_received")
    assert ev.data["threaded_by"] == "new_ticket"


def test_reference_to_customers_own_earlier_message_threads(hx):
    # Customers often reply to what they sent themselves (cc'ing more detail)
    hx.put(mail("Broken", msgid="orig@c"))
    hx.put(mail("more detail", msgid="second@c", References="<orig@c>"))
    hx.drain()
    [t] = hx.tickets()
    arts = [a for a in hx.articles(t.id) if a.direction == "in"]
    assert [a.threaded_by for a in arts] == ["new_ticket", "references"]
    assert "orig@c" in arts[1].thread_reason


@pytest.mark.parametrize("policy", ["reopen", "new_ticket", "reject"])
def test_reply_to_closed_ticket_follows_queue_policy(hx, policy):
    _set_policy(hx, policy)
    hx.put(mail("Broken", msgid="orig@c"))
    hx.drain()
    [t] = hx.tickets()
    _close(hx, t.id)
    hx.put(mail("Re: Broken", msgid="reply@c", In_Reply_To="<orig@c>"))
    hx.drain()
    tickets = hx.tickets()
    acks = hx.outbox()
    if policy == "reopen":
        assert len(tickets) == 1 and tickets[0].state == "open"
        assert len(acks) == 2
    elif policy == "new_ticket":
        assert len(tickets) == 2 and tickets[0].state == "closed"
        assert tickets[1].state == "new"
        reply = [a for a in hx.articles(tickets[1].id) if a.direction == "in"][0]
        assert "closed" in reply.thread_reason
    else:
        assert len(tickets) == 1 and tickets[0].state == "closed"
        assert len([a for a in hx.articles(t.id) if a.direction == "in"]) == 2
        # the customer is told the ticket stays closed (OTRS "auto reject")
        [queued] = [e for e in hx.events("auto_response_queued") if e.data["template"] != "ack_new"]
        assert queued.data["template"] == "reject_closed"
        assert b"is closed" in acks[1].raw


def test_follow_up_on_pending_ticket_sets_it_open(hx):
    hx.put(mail("Broken", msgid="orig@c"))
    hx.drain()
    [t] = hx.tickets()
    with hx.engine.begin() as c:
        c.execute(update(m.Ticket).where(m.Ticket.id == t.id).values(state="pending"))
    hx.put(mail("Re: Broken", msgid="r@c", In_Reply_To="<orig@c>"))
    hx.drain()
    assert hx.tickets()[0].state == "open"


def test_same_bytes_delivered_twice_make_one_article(hx):
    raw = mail("Once", msgid="once@c")
    hx.put(raw)
    hx.drain()
    hx.put(raw)  # an MTA that did not see our 250 retries with the same message
    hx.drain()
    assert len([a for a in hx.articles() if a.direction == "in"]) == 1
    assert len(hx.events("duplicate_ignored")) == 1


def test_failure_is_quarantined_with_reason_and_replayable(hx):
    # A template error makes processing fail: the message is kept, not dropped
    tmpl = hx.home.path / "templates" / "ack_new.j2"
    good = tmpl.read_text()
    tmpl.write_text("{% block subject %}{{ no_such_variable }}{% endblock %}{% block body %}x{% endblock %}")
    hx.renderer = type(hx.renderer)(hx.home.path / "templates")
    [iid] = hx.put(mail("Hello", msgid="q@c"), mail("Other", msgid="q2@c", sender="b@c.test"))[:1]
    hx.drain()
    row = hx.inbound(iid)
    assert row.state == "quarantined"
    assert "no_such_variable" in row.error
    assert hx.tickets() == []  # the failed message left nothing half-written behind
    listed = hx.home.cli("quarantine", "list", "--json", check=True).stdout
    assert b"no_such_variable" in listed
    # When the admin fixes the template and replays, the message becomes a ticket
    tmpl.write_text(good)
    hx.renderer = type(hx.renderer)(hx.home.path / "templates")
    proc = hx.home.cli("quarantine", "replay", str(iid))
    assert proc.returncode == 0, proc.stderr
    hx.drain()
    assert hx.inbound(iid).state == "done"
    assert len(hx.tickets()) == 1
    assert hx.home.cli("quarantine", "replay", str(iid)).returncode == 1


def test_recipient_no_queue_serves_is_quarantined(hx):
    [iid] = hx.put(mail("Lost"), rcpt="nobody@elsewhere.test")
    hx.drain()
    row = hx.inbound(iid)
    assert row.state == "quarantined" and "no configured queue" in row.error


def test_nul_bytes_and_broken_mime_are_stored(hx):
    raw = (b"From: weird@c.test\r\nTo: support@example.com\r\nSubject: nul\x00here\r\n"
           b"Content-Type: multipart/mixed; boundary=\"zz\"\r\n\r\n--zz\r\n"
           b"Content-Type: text/plain; charset=x-unknown\r\n\r\nbody\x00with nul \xff\xfe\r\n")
    [iid] = hx.put(raw)
    hx.drain()
    assert hx.inbound(iid).state == "done"
    [a] = [a for a in hx.articles() if a.direction == "in"]
    assert "body" in a.body_text and "\x00" not in a.body_text


@pytest.mark.parametrize("sender, headers, reason", [
    ("@sblab.att.com", {}, "no valid address"),
    ("alice@customer.test", {"Reply_To": "no-reply@shop.test"},
     "the reply address no-reply@shop.test does not take replies"),
], ids=["not-an-address", "no-reply-reply-to"])
def test_no_acknowledgement_to_an_address_that_takes_none(hx, sender, headers, reason):
    hx.put(mail("Where is my order?", sender=sender, msgid="nr@c", **headers))
    hx.drain()
    assert hx.outbox() == []
    [sup] = hx.events("auto_response_suppressed")
    assert reason in sup.data["reason"]


def test_message_whose_worker_died_is_retried_alone_then_quarantined(hx):
    import socket
    from datetime import timedelta

    from mailgw.queue import now
    from mailgw.worker import Worker

    # Given two messages leased by a worker of this host that no longer runs (it crashed
    # while processing them), one of them already claimed max_attempts times
    ids = hx.put(mail("crashed once", msgid="c1@c"), mail("crashes always", msgid="c2@c"),
                 mail("fresh", msgid="c3@c"))
    dead = f"{socket.gethostname()}:{2**22 + 12345}"  # above pid_max: cannot be running
    with hx.engine.begin() as c:
        c.execute(update(m.Inbound).where(m.Inbound.id.in_(ids[:2])).values(
            claimed_by=dead, claimed_until=now() + timedelta(minutes=5), attempts=1))
        c.execute(update(m.Inbound).where(m.Inbound.id == ids[1]).values(attempts=3))
    # When a new worker starts
    w = Worker(hx.engine, hx.worker.context, batch_size=64, max_attempts=3)
    # Then the one that crashed once is processed alone (oldest first)
    assert w.run_batch() == 1
    assert hx.inbound(ids[0]).state == "done" and hx.inbound(ids[2]).state == "pending"
    # And the row that used up its attempts is quarantined with the reason
    assert w.run_batch() == 1
    assert hx.inbound(ids[1]).state == "quarantined"
    assert "did not complete in 3 attempts" in hx.inbound(ids[1]).error
    assert w.run_batch() == 1
    assert hx.inbound(ids[2]).state == "done"


def test_housekeeping_frees_dead_workers_leases_but_not_its_own(hx):
    """The periodic release (own=False) runs beside this process's live worker: it frees the
    leases of a dead worker of this host and leaves this pid's; a starting worker frees both."""
    import os
    import socket
    from datetime import timedelta

    from mailgw.queue import now
    from mailgw.worker import release_dead_claims

    host = socket.gethostname()
    dead, me = f"{host}:{2**22 + 4321}", f"{host}:{os.getpid()}"
    other_host = "elsewhere.example:1"
    ids = hx.put(mail("a", msgid="h1@c"), mail("b", msgid="h2@c"), mail("c", msgid="h3@c"))
    with hx.engine.begin() as c:
        for row_id, owner in zip(ids, (dead, me, other_host), strict=True):
            c.execute(update(m.Inbound).where(m.Inbound.id == row_id).values(
                claimed_by=owner, claimed_until=now() + timedelta(minutes=5), attempts=1))

    assert release_dead_claims(hx.engine, own=False) == 1
    assert [hx.inbound(i).claimed_by for i in ids] == [None, me, other_host]
    assert release_dead_claims(hx.engine) == 1  # a worker starting: this pid's too
    assert [hx.inbound(i).claimed_by for i in ids] == [None, None, other_host]


def _refuse_subject_in_db(hx: Harness, subject: str) -> None:
    """A real database error for one message: a trigger refusing its article."""
    with hx.engine.begin() as c:
        if hx.engine.dialect.name == "sqlite":
            c.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON articles WHEN NEW.subject = "
                f"'{subject}' BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END")
        else:
            c.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.subject = "
                f"'{subject}' THEN RAISE EXCEPTION 'refused by test trigger'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql")
            c.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON articles "
                              "FOR EACH ROW EXECUTE FUNCTION refuse()")


def test_database_error_rolls_back_the_batch_and_quarantines_only_the_culprit(hx):
    # Given a batch in which one message makes the database refuse the transaction
    _refuse_subject_in_db(hx, "poison")
    ids = hx.put(mail("good 1", msgid="g1@c"), mail("poison", msgid="p@c"),
                 mail("good 2", msgid="g2@c", sender="bob@customer.test"))
    # When the worker drains the queue
    hx.drain()
    # Then the good messages are stored once, and the culprit is quarantined with the error
    assert [hx.inbound(i).state for i in ids] == ["done", "quarantined", "done"]
    assert "refused by test trigger" in hx.inbound(ids[1]).error
    assert hx.inbound(ids[1]).attempts == 3
    assert len([a for a in hx.articles() if a.direction == "in"]) == 2


def test_ack_to_a_follow_up_by_subject_number_references_the_tickets_first_message(hx):
    hx.put(mail("VPN down", msgid="first@c"))
    hx.drain()
    [t] = hx.tickets()
    hx.put(mail(f"[Ticket#{t.number}] still down", msgid="second@c"))
    hx.drain()
    from email import message_from_bytes

    acks = [message_from_bytes(o.raw) for o in hx.outbox()]
    assert acks[1]["In-Reply-To"] == "<second@c>"
    assert acks[1]["References"].split() == ["<first@c>", "<second@c>"]


def test_same_bytes_for_another_queue_is_not_a_duplicate(hx):
    # A pipe transport delivers one copy per recipient: both queues must get the message
    raw = mail("For both", msgid="both@c")
    hx.put(raw, rcpt="support@example.com")
    hx.put(raw, rcpt="billing@example.com")
    hx.drain()
    assert sorted(t.queue for t in hx.tickets()) == ["billing", "support"]
    assert hx.events("duplicate_ignored") == []


def test_out_of_office_does_not_reopen_a_closed_ticket(hx):
    hx.put(mail("Broken", msgid="orig@c"))
    hx.drain()
    [t] = hx.tickets()
    _close(hx, t.id)
    hx.put(mail("Abwesenheit", msgid="ooo@c", In_Reply_To="<orig@c>",
                Auto_Submitted="auto-replied"))
    hx.drain()
    [t] = hx.tickets()
    assert t.state == "closed"
    assert len([a for a in hx.articles(t.id) if a.direction == "in"]) == 2


def test_our_own_address_quoting_a_number_is_not_on_the_ticket(hx):
    hx.put(mail("Broken", msgid="orig@c"))
    hx.drain()
    [t] = hx.tickets()
    # Anyone can write From: support@example.com; our outgoing articles do not count
    hx.put(mail(f"[Ticket#{t.number}] hi", sender="support@example.com", msgid="forged@c"))
    hx.drain()
    assert len(hx.tickets()) == 2


def test_two_workers_holding_two_copies_of_one_delivery_store_it_once(hx):
    # On PostgreSQL two workers can hold the original and the MTA's retry at the same time.
    if hx.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer: two transactions cannot overlap")
    import threading

    from sqlalchemy.orm import Session

    from mailgw.process import Context, process

    raw = mail("Once only", msgid="race@c")
    first, second = hx.put(raw, raw)
    ctx = Context(hx.settings, hx.renderer)
    a = Session(hx.engine)
    a.begin()
    process(a, a.get(m.Inbound, first), ctx)  # worker A stored it, not yet committed
    finished = threading.Event()

    def worker_b() -> None:
        with Session(hx.engine) as b, b.begin():
            process(b, b.get(m.Inbound, second), ctx)
        finished.set()

    t = threading.Thread(target=worker_b)
    t.start()
    assert not finished.wait(1.0)  # B waits for A instead of storing a second copy
    a.commit()
    a.close()
    t.join(30)
    assert finished.is_set()
    assert len([x for x in hx.articles() if x.direction == "in"]) == 1
    assert len(hx.events("duplicate_ignored")) == 1


def test_configured_loop_header_marks_mail_automatic(hx):
    data = hx.home.config()
    data["loop_header"] = "X-Helpdesk-Loop"
    hx.home.write_config(data)
    hx.settings = hx.home.settings()
    hx.put(mail("Re: ours", msgid="lh@c", X_Helpdesk_Loop="support@other.test"))
    hx.drain()
    assert hx.outbox() == []
    [sup] = hx.events("auto_response_suppressed")
    assert "X-Helpdesk-Loop: support@other.test" in sup.data["reason"]


def test_a_lease_that_ran_out_is_taken_over(hx):
    """A message whose worker hung (its lease ran out; a worker of another host, so nobody
    frees it at once) is processed by another worker: by one that starts, and by a running
    one at its next look, on both stores. (Decision 33 had SQLite's running workers look for
    such leases every 10 s only: reading the lease read the whole message, stored before it
    in the row. With the raw mail in inbound_raw, decision 35, every look reads them.)"""
    from datetime import timedelta

    from mailgw import worker as wmod
    from mailgw.queue import now

    def hang(inbound_id: int) -> None:
        with hx.engine.begin() as c:
            c.execute(update(m.Inbound).where(m.Inbound.id == inbound_id).values(
                claimed_by="elsewhere.example:1", claimed_until=now() - timedelta(seconds=1),
                attempts=1))

    # Given a running worker that has looked for work once
    running = wmod.Worker(hx.engine, hx.worker.context, batch_size=64, max_attempts=3)
    assert running.run_batch() == 0
    # And a message leased by a hung worker of another host, its lease run out
    [hung] = hx.put(mail("hung", msgid="hung@c"))
    hang(hung)
    # Then a worker that starts takes it
    starting = wmod.Worker(hx.engine, hx.worker.context, batch_size=64, max_attempts=3)
    assert starting._claim() == [hung]
    hang(hung)  # (its lease run out again, as if it had not)
    # And so does the running one, at its next look
    assert running.run_batch() == 1
    assert hx.inbound(hung).state == "done"
