"""``mailgw deliver``: the MTA pipe. Exit codes are a contract (sysexits.h)."""

from __future__ import annotations

import json

from sqlalchemy import select

MAIL = (b"From: Carol <carol@customer.test>\r\nTo: billing@example.com\r\n"
        b"Subject: Invoice 42 is wrong\r\nMessage-ID: <inv42@customer.test>\r\n\r\n"
        b"Please check invoice 42.\r\n")


def test_deliver_queues_durably_and_exits_0(home):
    from mailgw.store import models as m

    proc = home.cli("deliver", "--sender", "carol@customer.test",
                    "--recipient", "billing@example.com", input=MAIL)
    assert proc.returncode == 0, proc.stderr
    engine = home.engine()
    with engine.connect() as c:
        row = c.execute(select(m.Inbound.raw, m.Inbound.source, m.Inbound.rcpt_tos,
                               m.Inbound.state)).one()
    engine.dispose()
    assert row.raw == MAIL and row.source == "pipe"
    assert row.rcpt_tos == ["billing@example.com"] and row.state == "pending"


def test_delivered_mail_is_processed_by_the_worker_into_the_recipients_queue(home, gateway):
    assert home.cli("deliver", "--recipient", "billing@example.com", input=MAIL).returncode == 0
    gateway.start()
    from tests.conftest import wait_until

    tickets = wait_until(lambda: json.loads(home.cli("tickets", "list", "--json").stdout),
                         what="ticket from the pipe")
    assert tickets[0]["queue"] == "billing"
    assert tickets[0]["customer"] == "carol@customer.test"


def test_deliver_queue_option_overrides_recipient(home, gateway):
    assert home.cli("deliver", "--queue", "support", "--recipient", "billing@example.com",
                    input=MAIL).returncode == 0
    gateway.start()
    from tests.conftest import wait_until

    tickets = wait_until(lambda: json.loads(home.cli("tickets", "list", "--json").stdout),
                         what="ticket")
    assert tickets[0]["queue"] == "support"


def test_deliver_without_sender_is_not_mistaken_for_a_bounce(home):
    # Without --sender the envelope sender is unknown, not the null sender "<>".
    from tests.helpers import Harness

    assert home.cli("deliver", "--recipient", "billing@example.com", input=MAIL).returncode == 0
    assert home.cli("deliver", "--sender", "", "--recipient", "billing@example.com",
                    input=MAIL.replace(b"inv42", b"inv43")).returncode == 0
    hx = Harness(home)
    hx.drain()
    [sent] = hx.events("auto_response_queued")
    [suppressed] = hx.events("auto_response_suppressed")
    hx.close()
    assert "null sender" in suppressed.data["reason"]
    assert sent.data["to"] == "carol@customer.test"


def test_input_that_is_not_mail_exits_65_and_stores_nothing(home):
    from mailgw.store import models as m

    for junk in (b"", b"\x00\x01\x02\xff binary junk \x00" * 10, b"just a line of text\n"):
        proc = home.cli("deliver", input=junk)
        assert proc.returncode == 65, (junk, proc.stderr)
    engine = home.engine()
    with engine.connect() as c:
        assert c.execute(select(m.Inbound.id)).first() is None
    engine.dispose()


def test_internal_failure_exits_75_so_the_mta_retries(home, tmp_path):
    # A store that cannot be reached is an internal, temporary failure.
    env_url = "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"
    home.store_url = env_url
    proc = home.cli("deliver", input=MAIL)
    assert proc.returncode == 75, proc.stderr
    assert b"temporary failure" in proc.stderr


def test_unknown_queue_option_is_a_temporary_failure_not_a_bounce(home):
    proc = home.cli("deliver", "--queue", "nope", input=MAIL)
    assert proc.returncode == 75
    assert b"no queue named 'nope'" in proc.stderr
