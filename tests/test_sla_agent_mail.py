"""Issues 6 and 7 together: the SLA clocks follow what agents do by mail.

The real worker on both stores: a customer opens a ticket under an SLA, the agent answers
through the signed reply address of the notification, and the clocks move as OTRS users
expect (an answer stops first response, #pending pauses, a follow-up starts an update
cycle, #merge cancels the merged ticket's clocks).
"""

from __future__ import annotations

from email import message_from_bytes

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailgw.store import models as m
from tests.helpers import Harness, mail
from tests.test_agent_mail import AGENT, agent_reply, deliver_to_token

SLA = {"name": "standard", "first_response": 60, "update": 120, "solution": 480,
       "levels": [{"percent": 75}, {"percent": 100}]}


def setup(home) -> Harness:  # type: ignore[no-untyped-def]
    data = home.config()
    data["agents"] = [{"name": "alice", "addresses": [AGENT], "queues": ["support"]}]
    data["slas"] = [SLA]
    home.write_config(data)
    return Harness(home)


def clocks(h: Harness, ticket_id: int) -> dict[tuple[str, int], m.SlaClock]:
    with Session(h.engine) as s:
        rows = s.scalars(select(m.SlaClock).where(m.SlaClock.ticket_id == ticket_id)).all()
        s.expunge_all()
    return {(c.target, c.cycle): c for c in rows}


def notification(h: Harness, n: int = -1):  # type: ignore[no-untyped-def]
    return [message_from_bytes(o.raw) for o in h.outbox() if o.rcpt_tos == [AGENT]][n]


def open_ticket(h: Harness, msgid: str = "first@customer.test", subject: str = "VPN down"):  # type: ignore[no-untyped-def]
    h.put(mail(subject, "Nothing works.", sender="carol@customer.test", msgid=msgid))
    h.drain()
    return max(h.tickets(), key=lambda t: t.id)


def answer(h: Harness, body: str, n: int = -1) -> None:
    note = notification(h, n)
    deliver_to_token(h, agent_reply(note, body), note["Reply-To"])


def test_agent_answer_by_mail_stops_first_response_and_update_cycle_follows(home):
    h = setup(home)
    ticket = open_ticket(h)
    c = clocks(h, ticket.id)
    assert c[("first_response", 0)].state == "running"
    assert c[("solution", 0)].state == "running"
    assert c[("first_response", 0)].next_notice_at is not None  # the 75 % warning is scheduled

    answer(h, "We are on it.")
    c = clocks(h, ticket.id)
    fr = c[("first_response", 0)]
    assert (fr.state, fr.outcome, fr.next_notice_at) == ("stopped", "met", None)
    assert c[("solution", 0)].state == "running"
    assert not [k for k in c if k[0] == "update"]

    # The customer writes again: an update cycle starts; the agent's next answer meets it.
    h.put(mail(f"Re: VPN down [Ticket#{ticket.number}]", "Still down.",
               sender="carol@customer.test", msgid="second@customer.test",
               In_Reply_To="<first@customer.test>"))
    h.drain()
    [upd] = [v for k, v in clocks(h, ticket.id).items() if k[0] == "update"]
    assert upd.state == "running" and upd.due_at is not None
    answer(h, "Fixed now.")
    [upd] = [v for k, v in clocks(h, ticket.id).items() if k[0] == "update"]
    assert (upd.state, upd.outcome) == ("stopped", "met")


def test_internal_note_does_not_stop_first_response(home):
    h = setup(home)
    ticket = open_ticket(h)
    note = notification(h)
    deliver_to_token(h, agent_reply(note, "#note\nChecking the logs first.", quote=False),
                     note["Reply-To"])
    fr = clocks(h, ticket.id)[("first_response", 0)]
    assert fr.state == "running" and fr.outcome is None
    assert [a for a in h.articles(ticket.id) if a.internal and a.sender_type == "agent"]


def test_pending_command_pauses_and_close_stops_the_clocks(home):
    h = setup(home)
    ticket = open_ticket(h)
    answer(h, "#pending 3d\nWaiting for your router model.")
    c = clocks(h, ticket.id)
    assert c[("first_response", 0)].outcome == "met"  # the answer went out with the command
    sol = c[("solution", 0)]
    assert (sol.state, sol.due_at, sol.next_notice_at) == ("paused", None, None)
    with Session(h.engine) as s:
        assert s.get(m.Ticket, ticket.id).state == "pending"

    answer(h, "#close")
    sol = clocks(h, ticket.id)[("solution", 0)]
    assert sol.state == "stopped" and sol.outcome == "met"
    with Session(h.engine) as s:
        assert s.get(m.Ticket, ticket.id).state == "closed"


def test_merge_cancels_the_merged_tickets_clocks_and_the_answer_lands_on_the_target(home):
    h = setup(home)
    target = open_ticket(h)
    dup = open_ticket(h, msgid="dup@customer.test", subject="VPN still down (again)")
    assert dup.id != target.id
    answer(h, f"#merge Ticket#{target.number}\nMerged into your first request.")
    c = clocks(h, dup.id)
    assert {v.outcome for v in c.values()} == {"cancelled"}
    with Session(h.engine) as s:
        assert s.get(m.Ticket, dup.id).state == "merged"
        answers = s.scalars(select(m.Article).where(
            m.Article.sender_type == "agent", m.Article.internal.is_(False))).all()
        assert [a.ticket_id for a in answers] == [target.id]
    # The target's first response was met by that answer.
    assert clocks(h, target.id)[("first_response", 0)].outcome == "met"


def test_tickets_show_gives_sla_pending_until_and_merge_target(home):
    import json

    h = setup(home)
    target = open_ticket(h)
    dup = open_ticket(h, msgid="dup@customer.test", subject="VPN again")
    answer(h, "#pending 2d\nWaiting for you.", n=0)  # the notification of the first ticket
    answer(h, f"#merge Ticket#{target.number}")
    shown = json.loads(home.cli("tickets", "show", target.number, "--json", check=True).stdout)
    assert shown["sla"] == "standard" and shown["state"] == "pending"
    assert shown["pending_until"] is not None and shown["merged_into"] is None
    merged = json.loads(home.cli("tickets", "show", dup.number, "--json", check=True).stdout)
    assert (merged["state"], merged["merged_into"]) == ("merged", target.number)
    text = home.cli("tickets", "show", dup.number, check=True).stdout.decode()
    assert f"merged into Ticket#{target.number}" in text


def test_pending_reminder_reopens_and_tells_the_owner_by_mail(home):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from mailgw.agent_commands import wake_pending_job
    from mailgw.outbound.render import Renderer

    h = setup(home)
    ticket = open_ticket(h)
    answer(h, "#take\n#pending 1d\nWaiting for the router model.")
    sol = clocks(h, ticket.id)[("solution", 0)]
    assert sol.state == "paused"
    # The reminder time passes.
    with h.engine.begin() as c:
        c.execute(update(m.Ticket).values(
            pending_until=datetime.now(UTC) - timedelta(minutes=1)))
    before = len([o for o in h.outbox() if o.rcpt_tos == [AGENT]])
    assert wake_pending_job(h.engine, home.settings(), Renderer(home.path / "templates")) == 1
    with Session(h.engine) as s:
        assert s.get(m.Ticket, ticket.id).state == "open"
    assert clocks(h, ticket.id)[("solution", 0)].state == "running"
    mails = [message_from_bytes(o.raw) for o in h.outbox() if o.rcpt_tos == [AGENT]]
    assert len(mails) == before + 1
    reminder = mails[-1]
    assert reminder["Subject"].startswith(f"[Ticket#{ticket.number}] Pending reminder")
    assert reminder["Reply-To"].startswith("support+t.")
    assert reminder["Auto-Submitted"] == "auto-generated"
    assert "is open again" in reminder.get_payload(decode=True).decode()
    # An answer to the reminder reaches the customer like any agent answer.
    deliver_to_token(h, agent_reply(reminder, "Any news?", quote=False), reminder["Reply-To"])
    assert [o for o in h.outbox() if o.rcpt_tos == ["carol@customer.test"]
            and b"Any news?" in o.raw]
