"""Agent mail in the worker (mailgw/agent_mail/): notifications, answers, notes, trust.

Runs the real worker against SQLite and PostgreSQL (the ``home`` fixture); what would be
sent is read back from the outbox rows, parsed like any mail.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.utils import getaddresses

import pytest

from mailgw.agent_mail.tokens import make_address
from tests.helpers import Harness, mail

AGENT = "alice@agents.test"


def setup(home, agents=None, **agent_mail) -> Harness:  # type: ignore[no-untyped-def]
    data = home.config()
    data["agents"] = agents if agents is not None else [
        {"name": "alice", "addresses": [AGENT, "alice@home.test"], "queues": ["support"]},
        {"name": "bob", "addresses": ["bob@agents.test"], "queues": ["billing"]}]
    data["agent_mail"] = {**data["agent_mail"], **agent_mail}
    home.write_config(data)
    return Harness(home)


def outgoing(h: Harness, to: str) -> list:  # type: ignore[no-untyped-def]
    return [message_from_bytes(o.raw) for o in h.outbox() if o.rcpt_tos == [to]]


def customer_opens_ticket(h: Harness, subject: str = "Printer on fire",
                          body: str = "Room 4 is burning.\nPlease hurry.", **headers: str):  # type: ignore[no-untyped-def]
    h.put(mail(subject, body, sender="Carol Customer <carol@customer.test>",
               msgid="first@customer.test", **headers))
    h.drain()
    [ticket] = h.tickets()
    return ticket


def agent_reply(notification, body: str, sender: str = AGENT, to: str | None = None,
                quote: bool = True, attachment: bytes | None = None,
                **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice Agent <{sender}>"
    msg["To"] = to or notification["Reply-To"]
    msg["Subject"] = "Re: " + notification["Subject"]
    msg["Message-ID"] = f"<agent.{abs(hash(body))}@agents.test>"
    msg["In-Reply-To"] = notification["Message-ID"]
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    text = body
    if quote:
        original = notification.get_payload(decode=True).decode()
        text += ("\n\nOn Fri, 27 Nov 2026 at 10:00, Carol Customer via support "
                 "<support@example.com> wrote:\n" + "".join(
                     f"> {line}\n" for line in original.splitlines()))
    msg.set_content(text)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf",
                           filename="invoice.pdf")
    return msg.as_bytes()


def deliver_to_token(h: Harness, raw: bytes, address: str, sender: str = AGENT) -> None:
    h.put(raw, rcpt=address, mail_from=sender)
    h.drain()


def test_customer_mail_notifies_queue_agents_with_signed_reply_address(home):
    h = setup(home)
    ticket = customer_opens_ticket(h)

    [note] = outgoing(h, AGENT)
    assert not outgoing(h, "bob@agents.test")  # bob serves billing, not support
    name, address = getaddresses([note["From"]])[0]
    assert (name, address) == ("Carol Customer via Example Support", "support@example.com")
    assert note["Reply-To"].startswith("support+t.") and note["Reply-To"].endswith("@example.com")
    assert f"[Ticket#{ticket.number}]" in note["Subject"]
    assert note["Auto-Submitted"] == "auto-generated"
    assert note["In-Reply-To"] == "<first@customer.test>"
    assert note["References"].split()[0] == "<first@customer.test>"
    assert note["Message-ID"].endswith("@helpdesk.test>")
    body = note.get_payload(decode=True).decode()
    assert "Room 4 is burning." in body
    assert "support+c." in body and "http" not in body
    # Sent with a VERP envelope sender, recorded as an internal system article.
    [row] = [o for o in h.outbox() if o.rcpt_tos == [AGENT]]
    assert row.mail_from.startswith("bounces+")
    [art] = [a for a in h.articles() if a.to_addrs == AGENT]
    assert art.internal and art.sender_type == "system" and art.agent == "alice"
    assert [e.data["agent"] for e in h.events("agent_notified")] == ["alice"]


def test_followup_goes_to_the_owner_only(home):
    h = setup(home, agents=[
        {"name": "alice", "addresses": [AGENT], "queues": ["support"]},
        {"name": "dave", "addresses": ["dave@agents.test"], "queues": ["support"]}])
    ticket = customer_opens_ticket(h)
    assert len(outgoing(h, AGENT)) == 1 and len(outgoing(h, "dave@agents.test")) == 1
    h.put(mail(f"Re: Printer [Ticket#{ticket.number}]", "Still burning",
               sender="carol@customer.test", msgid="second@customer.test",
               In_Reply_To="<first@customer.test>"))
    # Give the ticket an owner: the follow-up goes to dave alone.
    from sqlalchemy import update

    from mailgw.store import models as m
    with h.engine.begin() as c:
        c.execute(update(m.Ticket).values(owner="dave"))
    h.drain()
    assert len(outgoing(h, AGENT)) == 1
    [_, follow] = outgoing(h, "dave@agents.test")
    assert follow["Subject"].startswith(f"[Ticket#{ticket.number}] Follow-up")
    assert follow["In-Reply-To"] == "<second@customer.test>"
    assert follow["References"].split()[0] == "<first@customer.test>"


def test_no_agents_no_notifications(home):
    h = Harness(home)
    customer_opens_ticket(h)
    assert [o.rcpt_tos for o in h.outbox()] == [["carol@customer.test"]]  # the ack only
    assert not h.events("agent_notified")


def test_agent_reply_reaches_customer_from_queue_stripped_with_attachment(home):
    h = setup(home)
    ticket = customer_opens_ticket(h, Reply_To="Carol Desk <desk@customer.test>")
    [note] = outgoing(h, AGENT)
    pdf = b"%PDF-1.4 invoice " * 50
    deliver_to_token(h, agent_reply(note, "Hello Carol,\n\nthe fire brigade is on its way.",
                                    attachment=pdf), note["Reply-To"])

    [ack, sent] = outgoing(h, "desk@customer.test")  # Reply-To of the customer's mail
    assert ack["Auto-Submitted"] == "auto-replied" and sent["Auto-Submitted"] is None
    assert getaddresses([sent["From"]])[0][1] == "support@example.com"
    assert sent["Subject"] == f"[Ticket#{ticket.number}] Re: Printer on fire"
    assert sent["In-Reply-To"] == "<first@customer.test>"
    assert sent["References"] == "<first@customer.test>"
    assert sent["Cc"] is None and sent["Reply-To"] is None
    headers = "\n".join(f"{k}: {v}" for k, v in sent.items()).lower()
    assert "agents.test" not in headers and "alice" not in headers
    [text_part, attached] = list(sent.walk())[1:]
    text = text_part.get_payload(decode=True).decode()
    assert "fire brigade is on its way" in text
    assert "Room 4 is burning" not in text and "wrote:" not in text  # quote stripped
    assert attached.get_filename() == "invoice.pdf"
    assert attached.get_payload(decode=True) == pdf
    row = [o for o in h.outbox() if o.rcpt_tos == ["desk@customer.test"]][-1]
    assert row.mail_from.startswith("bounces+")
    [art] = [a for a in h.articles() if a.sender_type == "agent"]
    assert (art.direction, art.agent, art.internal) == ("out", "alice", False)
    assert art.message_id == sent["Message-ID"].strip("<>")
    assert "Room 4 is burning" in (art.quoted_text or "")
    [ticket] = h.tickets()
    assert ticket.state == "open"
    assert [e.data["to"] for e in h.events("agent_reply_sent")] == ["desk@customer.test"]

    # The customer's answer to it threads back onto the ticket.
    h.put(mail("Re: " + sent["Subject"], "Thanks!", sender="desk@customer.test",
               msgid="third@customer.test", In_Reply_To=sent["Message-ID"]))
    h.drain()
    assert len(h.tickets()) == 1


def test_internal_note_by_comment_address_and_by_note_line_is_not_sent(home):
    h = setup(home)
    ticket = customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    before = len(h.outbox())
    comment = make_address(h.settings, h.settings.queue("support"), "c",
                           h.settings.agent("alice"), ticket.id)
    deliver_to_token(h, agent_reply(note, "Customer is known to exaggerate.", to=comment),
                     comment)
    deliver_to_token(h, agent_reply(note, "#note\nCalled them, all fine."), note["Reply-To"])
    assert len(h.outbox()) == before  # nothing to anyone
    notes = [a for a in h.articles() if a.sender_type == "agent"]
    assert [(a.internal, a.agent) for a in notes] == [(True, "alice"), (True, "alice")]
    assert "exaggerate" in notes[0].body_text and "Room 4" not in notes[0].body_text
    assert notes[1].body_text.strip() == "Called them, all fine."
    assert len(h.events("agent_note_added")) == 2
    assert h.tickets()[0].state == "new"  # a note is no answer


def test_forged_agent_from_without_token_is_customer_mail_and_logged(home):
    h = setup(home)
    h.put(mail("Please close ticket 1", "#close", sender=AGENT), mail_from=AGENT)
    h.drain()
    [ticket] = h.tickets()
    [art] = h.articles(ticket.id)[:1]
    assert (art.sender_type, art.direction) == ("customer", "in")
    [ev] = h.events("agent_forgery_suspected")
    assert ev.data["agent"] == "alice" and ev.data["action"] == "processed as customer mail"


def test_forged_from_with_refuse_is_quarantined_and_the_agent_told(home):
    h = setup(home, forged="refuse")
    [inbound_id] = h.put(mail("Close it", "#close", sender=AGENT), mail_from=AGENT)
    h.drain()
    assert h.tickets() == []
    row = h.inbound(inbound_id)
    assert row.state == "quarantined" and "alice" in row.error and row.raw
    assert h.events("agent_forgery_suspected")
    [told] = outgoing(h, AGENT)
    assert told["Subject"].startswith("Not sent:")
    assert "not sent to a signed reply address" in told.get_payload(decode=True).decode()


def test_token_with_a_strangers_from_is_not_an_agent_answer(home):
    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    before = {o.id for o in h.outbox()}
    deliver_to_token(h, agent_reply(note, "I am totally alice", sender="mallory@evil.test"),
                     note["Reply-To"], sender="mallory@evil.test")
    assert not [a for a in h.articles() if a.sender_type == "agent"]
    [ev] = h.events("agent_forgery_suspected")
    assert ev.data["from_addr"] == "mallory@evil.test"
    # Treated as customer mail (forged: customer): nothing reaches carol.
    new = [o for o in h.outbox() if o.id not in before]
    assert all(o.rcpt_tos != ["carol@customer.test"] for o in new)


@pytest.mark.parametrize("damage", ["tampered", "expired", "removed_key", "other_queue"])
def test_bad_tokens_are_refused_and_nothing_reaches_the_customer(home, damage):
    h = setup(home)
    ticket = customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    address = note["Reply-To"]
    if damage == "tampered":
        local, _, domain = address.partition("@")
        address = local[:-3] + ("aaa" if local[-3:] != "aaa" else "bbb") + "@" + domain
    elif damage == "expired":
        address = make_address(h.settings, h.settings.queue("support"), "t",
                               h.settings.agent("alice"), ticket.id,
                               datetime.now(UTC) - timedelta(days=31))
    elif damage == "removed_key":
        data = home.config()
        data["agent_mail"]["keys"] = [{"id": "k9", "secret": "a-brand-new-secret-000"}]
        home.write_config(data)
        h = Harness(home)
    else:  # alice no longer serves support
        data = home.config()
        data["agents"][0]["queues"] = ["billing"]
        home.write_config(data)
        h = Harness(home)
    before = len(h.outbox())
    [inbound_id] = h.put(agent_reply(note, "Answer", to=address), rcpt=address,
                         mail_from=AGENT)
    h.drain()
    assert not [a for a in h.articles() if a.sender_type == "agent"]
    assert h.inbound(inbound_id).state == "quarantined"
    [ev] = h.events("agent_mail_refused")
    reason = ev.data["reasons"][0]
    assert {"tampered": "altered", "expired": "expired", "removed_key": "no longer configured",
            "other_queue": "does not serve queue support"}[damage] in reason
    new = h.outbox()[before:]
    assert [o.rcpt_tos for o in new] == [[AGENT]]  # only the agent hears why
    assert not outgoing(h, "carol@customer.test")[1:]  # the ack, nothing more


def test_agent_out_of_office_is_stored_internally_and_not_sent(home):
    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    before = len(h.outbox())
    deliver_to_token(h, agent_reply(note, "I am out of the office until Monday.",
                                    quote=False, Auto_Submitted="auto-replied"),
                     note["Reply-To"])
    assert len(h.outbox()) == before
    [art] = [a for a in h.articles() if a.sender_type == "agent"]
    assert art.internal and art.is_automatic and art.agent == "alice"
    assert h.events("agent_auto_reply_stored")
    assert h.tickets()[0].state == "new"


AUTH = "mx.helpdesk.test"


@pytest.mark.parametrize("headers,ok", [
    ([], False),
    ([f"{AUTH}; dkim=fail header.d=agents.test"], False),
    ([f"{AUTH}; dkim=pass header.d=evil.test"], False),  # not aligned with From
    (["other.mx; dkim=pass header.d=agents.test"], False),  # untrusted authserv-id
    ([f"{AUTH}; dkim=fail header.d=agents.test", f"{AUTH}; dkim=pass header.d=agents.test"],
     False),  # only the topmost of the trusted id counts
    (["other.mx; dkim=fail", f"{AUTH}; dkim=pass header.d=agents.test"], True),
    ([f"{AUTH}; spf=pass smtp.mailfrom=agents.test; dkim=pass header.d=agents.test"], True),
    # The trusted header made unreadable by the sender (a HELO literal), the sender's own
    # "pass" below it: the topmost header of the trusted id decides, and it cannot be read.
    ([f"{AUTH}; dkim=none; spf=none smtp.helo=[192.0.2.1]",
      f"{AUTH}; dkim=pass header.d=agents.test"], False),
    ([f"{AUTH}; dkim=pass header.i=@agents.test"], True),  # identity only (Google's form)
])
def test_required_dkim_from_the_trusted_authserv_id(home, headers, ok):
    h = setup(home, require_auth="dkim", authserv_id=AUTH)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    raw = agent_reply(note, "We are on it.")
    raw = b"".join(f"Authentication-Results: {v}\r\n".encode() for v in headers) + raw
    deliver_to_token(h, raw, note["Reply-To"])
    assert bool(outgoing(h, "carol@customer.test")[1:]) is ok
    if not ok:
        [ev] = h.events("agent_mail_refused")
        assert "DKIM" in ev.data["reasons"][0]


def test_required_dmarc(home):
    h = setup(home, require_auth="dmarc", authserv_id=AUTH)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    raw = agent_reply(note, "Fail first.")
    deliver_to_token(h, f"Authentication-Results: {AUTH}; dmarc=fail header.from=agents.test"
                     "\r\n".encode() + raw, note["Reply-To"])
    assert not outgoing(h, "carol@customer.test")[1:]
    raw = agent_reply(note, "Now it passes.")
    deliver_to_token(h, f"Authentication-Results: {AUTH}; dmarc=pass header.from=agents.test"
                     "\r\n".encode() + raw, note["Reply-To"])
    [_, sent] = outgoing(h, "carol@customer.test")
    assert "Now it passes." in sent.get_payload(decode=True).decode()


# --- commands (mailgw/agent_commands.py, branch agent-cmd; skipped until it is merged) ---


def test_reply_with_close_command_closes_and_answers(home):
    pytest.importorskip("mailgw.agent_commands", reason="agent-cmd branch not merged yet")
    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    deliver_to_token(h, agent_reply(note, "#close\nFixed, closing this."), note["Reply-To"])
    [_, sent] = outgoing(h, "carol@customer.test")
    text = sent.get_payload(decode=True).decode()
    assert "Fixed, closing this." in text and "#close" not in text
    assert h.tickets()[0].state == "closed"


def test_refused_command_sends_nothing_and_tells_the_agent(home):
    pytest.importorskip("mailgw.agent_commands", reason="agent-cmd branch not merged yet")
    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    deliver_to_token(h, agent_reply(note, "#frobnicate\n#close\nDone."), note["Reply-To"])
    assert not outgoing(h, "carol@customer.test")[1:]
    assert h.tickets()[0].state == "new"  # all or nothing: #close not applied either
    [_, told] = outgoing(h, AGENT)
    body = told.get_payload(decode=True).decode()
    assert told["Subject"].startswith("Not sent:")
    assert f"[Ticket#{h.tickets()[0].number}]" in told["Subject"]
    assert "frobnicate" in body
    [art] = [a for a in h.articles() if a.sender_type == "agent"]
    assert art.internal and "refused" in art.thread_reason


def test_config_check_insists_on_agent_templates_once_a_key_is_set(home):
    assert home.cli("config", "check").returncode == 0  # init wrote a key and the templates
    (home.path / "templates" / "agent_refused.j2").unlink()
    proc = home.cli("config", "check")
    assert proc.returncode == 1 and b"templates/agent_refused.j2" in proc.stderr
    data = home.config()
    del data["agent_mail"]  # agent mail off: the template is not needed
    home.write_config(data)
    assert home.cli("config", "check").returncode == 0


def test_refusal_notices_to_an_agent_are_rate_limited(home):
    # Junk in an agent's name must not make us mail the agent without end.
    setup(home, forged="refuse").close()
    data = home.config()
    data["loop_protection"] = {"max_per_sender": 1}
    home.write_config(data)
    h = Harness(home)
    h.put(mail("one", "x", sender=AGENT), mail("two", "y", sender=AGENT), mail_from=AGENT)
    h.drain()
    assert len(outgoing(h, AGENT)) == 1
    [hit] = h.events("rate_limit_hit")
    assert hit.data["to"] == AGENT and hit.data["notice"] == "agent_refused"


def test_answer_subject_does_not_stack_reply_prefixes(home):
    h = setup(home)
    ticket = customer_opens_ticket(h, subject="Re: your invoice")
    [note] = outgoing(h, AGENT)
    deliver_to_token(h, agent_reply(note, "See attached."), note["Reply-To"])
    [_, sent] = outgoing(h, "carol@customer.test")
    assert sent["Subject"] == f"[Ticket#{ticket.number}] Re: your invoice"


def test_answer_with_only_an_attachment_is_sent(home):
    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    deliver_to_token(h, agent_reply(note, "", quote=False, attachment=b"%PDF-1.4 x"),
                     note["Reply-To"])
    [_, sent] = outgoing(h, "carol@customer.test")
    assert [p.get_filename() for p in sent.walk()][-1] == "invoice.pdf"


def test_dmarc_pass_without_header_from_is_not_trusted(home):
    h = setup(home, require_auth="dmarc", authserv_id=AUTH)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    deliver_to_token(h, f"Authentication-Results: {AUTH}; dmarc=pass\r\n".encode()
                     + agent_reply(note, "We are on it."), note["Reply-To"])
    assert not outgoing(h, "carol@customer.test")[1:]


def test_an_attached_original_is_refused_not_sent(home):
    from email import policy

    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    msg = message_from_bytes(agent_reply(note, "Hello Carol, fixed.", quote=False),
                             policy=policy.default)
    msg.add_attachment(message_from_bytes(note.as_bytes(), policy=policy.default))
    deliver_to_token(h, msg.as_bytes(), note["Reply-To"])
    assert not outgoing(h, "carol@customer.test")[1:]  # only the acknowledgement
    [_, refusal] = outgoing(h, AGENT)
    assert "message/rfc822" in refusal.get_payload(decode=True).decode()


def test_the_agents_address_in_an_unmarked_signature_is_not_sent(home):
    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    deliver_to_token(h, agent_reply(note, f"Hi Carol,\n\nfixed.\n\nAlice Agent\n{AGENT}\n"
                                    f"write to {note['Reply-To']}\n+1 555 0100"),
                     note["Reply-To"])
    [_, sent] = outgoing(h, "carol@customer.test")
    body = sent.get_payload(decode=True).decode()
    assert "fixed." in body and "Alice Agent" in body
    assert AGENT not in body and "+t." not in body and "+c." not in sent.as_string()
    [ev] = h.events("agent_reply_scrubbed")
    assert ev.data["lines_removed"] == 2


def test_automatic_mail_with_a_token_but_a_strangers_from_is_not_an_agent_article(home):
    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    deliver_to_token(h, agent_reply(note, "Mallory's text in alice's name", quote=False,
                                    sender="mallory@evil.test", Auto_Submitted="auto-replied"),
                     note["Reply-To"], sender="mallory@evil.test")
    assert not [a for a in h.articles() if a.sender_type == "agent"]
    assert h.events("agent_forgery_suspected")
    assert not outgoing(h, "carol@customer.test")[1:]


def test_an_agents_mail_without_token_is_never_the_customer_answered(home):
    h = setup(home)
    customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    # The agent writes to the plain queue address (e.g. answering a notice that had no
    # token) with a Reply-To of their team; it is customer mail on the ticket (forged:
    # customer), but the next answer still goes to the customer.
    msg = EmailMessage()
    msg["From"], msg["To"] = f"Alice Agent <{AGENT}>", "support@example.com"
    msg["Subject"] = note["Subject"]
    msg["Message-ID"], msg["In-Reply-To"] = "<internal.1@agents.test>", note["Message-ID"]
    msg["Reply-To"] = "alice-team@agents.test"
    msg.set_content("Internal: be careful with this one.")
    h.put(msg.as_bytes(), rcpt="support@example.com", mail_from=AGENT)
    h.drain()
    deliver_to_token(h, agent_reply(note, "Hi Carol, done."), note["Reply-To"])
    [last] = [m for m in outgoing(h, "carol@customer.test") if b"done." in m.as_bytes()]
    assert last["In-Reply-To"] == "<first@customer.test>"
    # (the team address got the acknowledgement of that "customer" mail, not the answer)
    assert not [m for m in outgoing(h, "alice-team@agents.test") if b"done." in m.as_bytes()]


def test_the_same_agent_mail_again_is_acted_on_once(home):
    h = setup(home)
    ticket = customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    raw = agent_reply(note, "#priority 1\nAnswer once.")
    deliver_to_token(h, raw, note["Reply-To"])
    # The same mail again with one more Received header (sent twice, or replayed).
    deliver_to_token(h, b"Received: from x by y; Fri, 27 Nov 2026 10:00:00 +0000\r\n" + raw,
                     note["Reply-To"])
    assert len([m for m in outgoing(h, "carol@customer.test") if b"Answer once." in m.as_bytes()]) == 1
    assert len(h.events("agent_command")) == 1
    [dup] = h.events("agent_mail_duplicate")
    assert dup.ticket_id == ticket.id
    # A new mail (another Message-ID) is acted on as usual.
    deliver_to_token(h, agent_reply(note, "And a second answer."), note["Reply-To"])
    assert [m for m in outgoing(h, "carol@customer.test") if b"second answer" in m.as_bytes()]


def test_the_customer_replying_all_to_a_signed_address_is_a_follow_up(home):
    """An agent Cc'd the customer on an answer sent to the signed address; the customer
    replies to all. Even with ``forged: refuse`` that is the customer's follow-up on their
    ticket, not a forgery: no quarantine, no agent power, the ticket gets the article."""
    h = setup(home, forged="refuse")
    ticket = customer_opens_ticket(h)
    [note] = outgoing(h, AGENT)
    token_address = note["Reply-To"]
    reply = mail("Re: Printer on fire", "#close\nStill burning, thanks for looking.",
                 sender="Carol Customer <carol@customer.test>", msgid="second@customer.test",
                 to=token_address, In_Reply_To="<first@customer.test>",
                 References="<first@customer.test>")
    [inbound_id] = h.put(reply, rcpt=token_address, mail_from="carol@customer.test")
    h.drain()
    assert h.inbound(inbound_id).state == "done"
    assert not h.events("agent_forgery_suspected") and not h.events("quarantined")
    [ev] = h.events("token_address_used_by_customer")
    assert ev.data == {"agent": "alice", "from_addr": "carol@customer.test"}
    [t] = h.tickets()
    assert t.id == ticket.id and t.state != "closed"  # "#close" from a customer is just text
    arts = [a for a in h.articles(ticket.id) if a.direction == "in"]
    assert [a.sender_type for a in arts] == ["customer", "customer"]
    assert arts[-1].message_id == "second@customer.test"
