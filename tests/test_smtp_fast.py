"""The SMTP shortcuts do what the libraries do: the intake's address parsing what aiosmtpd
does (mailgw/intake/smtp.py), the sender's MAIL/RCPT what smtplib sends
(mailgw/outbound/sender.py)."""

from __future__ import annotations

import random
import smtplib

from aiosmtpd.smtp import SMTP

FIXED = [
    "<bench@customer.test> SIZE=123", "<a@b>", "<a@b>  BODY=8BITMIME SIZE=5", "<a@b>(c) X",
    "<a.b@c.d>SIZE=1", "<>", "<a..b@c>", '<"q"@c>', "<a@[1.2.3.4]>", "<a@b.>", "<a@b> \tX",
    "< a@b>", "<@x:a@b>", "<=?utf-8?q?x?=@b>", "<=?utf-8?q?x?=.y@b>", "<a=?x?=@b>", "a@b",
    "<a@b> (comment) SIZE=1", "<a@b>\t(c)", "<jürgen@b>", "<a@b", "<a@b>>", "",
    "<bounces+42-abcdef@example.com>", "<x@" + "d" * 300 + ".test>",
    "<" + "l" * 65 + "@b>", "<" + "l" * 64 + "@b>",
]


def _pair():  # type: ignore[no-untyped-def]
    from mailgw.intake.smtp import _FastAddress

    class Ours(_FastAddress, SMTP):
        pass

    class Theirs(SMTP):
        pass

    handler = object()
    return Ours(handler), Theirs(handler)


def test_fast_address_parsing_equals_aiosmtpd_on_crafted_and_random_addresses():
    ours, theirs = _pair()
    rnd = random.Random(8)
    alphabet = "ab.-_+=?@<>()\"[]:; \tÜ!#%/"
    cases = list(FIXED)
    for _ in range(20_000):
        body = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 14)))
        cases.append(rnd.choice(["<", "", "< "]) + body + rnd.choice([">", "> X=1", ">(c)", ""]))
        # mostly well-formed, so the shortcut is taken often
        local = ".".join("".join(rnd.choice("ab+=?-_!#") for _ in range(rnd.randint(1, 4)))
                         for _ in range(rnd.randint(1, 3)))
        domain = ".".join("".join(rnd.choice("ab-9") for _ in range(rnd.randint(1, 4)))
                          for _ in range(rnd.randint(1, 3)))
        cases.append(f"<{local}@{domain}>" + rnd.choice(["", " SIZE=10", "  \tBODY=7BIT", "(x)"]))
    for arg in cases:
        assert _outcome(ours, arg) == _outcome(theirs, arg), arg
    ours.local_part_limit = theirs.local_part_limit = 64  # RFC 5321's, when configured
    for arg in FIXED:
        assert _outcome(ours, arg) == _outcome(theirs, arg), arg


def _outcome(session, arg: str):  # type: ignore[no-untyped-def]
    try:
        return session._getaddr(arg)
    except Exception as exc:  # noqa: BLE001 - aiosmtpd's parser raises on some input
        return type(exc)


def test_fast_address_parsing_is_taken_for_plain_addresses(monkeypatch):
    # The shortcut must really be the path of the common case (else it gains nothing).
    ours, _ = _pair()

    def refuse(self, arg):  # type: ignore[no-untyped-def]
        raise AssertionError(f"parser used for {arg!r}")

    monkeypatch.setattr(SMTP, "_getaddr", refuse)
    assert ours._getaddr("<bench@customer.test> SIZE=123") == ("bench@customer.test", "SIZE=123")
    assert ours._getaddr("<bounces+42-ab_c@mail.example.com>") == (
        "bounces+42-ab_c@mail.example.com", "")


def test_gateway_session_accepts_and_refuses_addresses_as_before(home, gateway):
    gateway.start()
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as s:
        s.ehlo()
        assert s.docmd("MAIL", "FROM:<a@customer.test> SIZE=100")[0] == 250
        assert s.docmd("RCPT", "TO:<support@example.com>")[0] == 250
        assert s.docmd("RCPT", "TO:<nobody@example.com>")[0] == 550
        assert s.docmd("RCPT", "TO:<support@example.com> FOO")[0] == 555  # unknown parameter
        assert s.docmd("RCPT", "TO:<a@b.>")[0] == 553  # not an address
        assert s.docmd("RCPT", 'TO:<"support"@example.com>')[0] == 250  # the parser's case


def test_sender_quotes_plain_addresses_as_smtplib_does():
    from mailgw.outbound.sender import _PLAIN_ADDR

    rnd = random.Random(9)
    cases = ["a@b", "bounces+42-ab_c@mail.example.com", "a..b@c", ".a@b", "a@b.", "a b@c",
             "<a@b>", "A <a@b>", '"a b"@c', "a@[1.2.3.4]", "jürgen@b", "a=?x?=@b", "(c)a@b",
             "a@b,c@d", "", "@b", "a@", "a@b@c"]
    for _ in range(20_000):
        cases.append("".join(rnd.choice("ab.-_+=?@<>()\"[]:; ,!#%/Ü") for _ in range(rnd.randint(0, 12))))
        local = ".".join("".join(rnd.choice("aZ9+=?-_!#'") for _ in range(rnd.randint(1, 4)))
                         for _ in range(rnd.randint(1, 3)))
        cases.append(f"{local}@" + ".".join("ab-9"[rnd.randint(0, 3)] * rnd.randint(1, 3)
                                             for _ in range(rnd.randint(1, 3))))
    taken = 0
    for addr in cases:
        if _PLAIN_ADDR.fullmatch(addr):
            taken += 1
            assert smtplib.quoteaddr(addr) == f"<{addr}>", addr
    assert taken > 15_000


def test_sender_writes_the_commands_smtplib_writes(sink):
    from mailgw.outbound.sender import _Relay

    def recording(cls):  # type: ignore[no-untyped-def]
        class Recording(cls):  # type: ignore[valid-type, misc]
            def putcmd(self, cmd, args=""):  # type: ignore[no-untyped-def]
                self.sent.append((cmd, args))
                super().putcmd(cmd, args)
        return Recording

    mails = [("bounces+1-x@example.com", ["a@customer.test", "B <b@customer.test>"]),
             ("", ["a@customer.test"]), ("x y@example.com", ["c@customer.test"])]
    wire = []
    for cls in (recording(_Relay), recording(smtplib.SMTP)):
        with cls("127.0.0.1", sink.port, timeout=10) as relay:
            relay.sent = []
            for mail_from, rcpts in mails:
                relay.sendmail(mail_from, rcpts, b"Subject: x\r\n\r\nbody\r\n")
            relay.sendmail("p@example.com", ["q@customer.test"], b"Subject: y\r\n\r\n",
                           mail_options=["BODY=8BITMIME"])
            relay.rcpt("r@customer.test", ["NOTIFY=NEVER"])  # the sink refuses it: 555
            relay.rset()
            wire.append(relay.sent)
    # The same commands, byte for byte, SIZE= and the other parameters included
    assert wire[0] == wire[1]
    assert ("mail", "FROM:<bounces+1-x@example.com> size=20") in wire[0]
    assert [m[0] for m in sink.messages[:3]] == ["bounces+1-x@example.com", "<>", "\"x y\"@example.com"]


class _Clock:
    """A loop standing in for asyncio's: its time is set by the test; call_at is recorded."""

    def __init__(self) -> None:
        import asyncio

        self.now = 0.0
        self.timers: list = []  # type: ignore[type-arg]
        self.fired: set[int] = set()
        self._loop = asyncio.new_event_loop()

    def time(self) -> float:
        return self.now

    def call_at(self, when, cb):  # type: ignore[no-untyped-def]
        import asyncio

        h = asyncio.TimerHandle(when, cb, (), self._loop)
        self.timers.append(h)
        return h

    def fire_due(self) -> None:
        for h in sorted(self.timers, key=lambda h: h.when()):
            if not h.cancelled() and h.when() <= self.now and id(h) not in self.fired:
                self.fired.add(id(h))
                h._run()


def test_idle_timeout_ends_the_session_timeout_after_the_last_command_with_one_timer():
    from mailgw.intake.smtp import _IdleTimer

    closed: list[float] = []

    class Session(_IdleTimer, SMTP):
        def _timeout_cb(self):  # type: ignore[no-untyped-def]
            closed.append(clock.now)

    clock = _Clock()
    s = Session(object(), timeout=10)
    s.loop = clock  # type: ignore[assignment]
    # Given a session whose commands come every 3 s for 30 s
    s._reset_timeout()
    for t in range(3, 31, 3):
        clock.now = float(t)
        clock.fire_due()
        s._reset_timeout()
    # Then it did not time out, and the commands made no timer each
    assert closed == [] and len(clock.timers) <= 5
    # When it falls silent, it ends 10 s after its last command, not before
    for t in (35, 39.9):
        clock.now = t
        clock.fire_due()
        assert closed == []
    clock.now = 40.0
    clock.fire_due()
    assert closed == [40.0]
    # And a shorter timeout asked for (aiosmtpd's PROXY wait) arms an earlier timer
    s2 = Session(object(), timeout=10)
    s2.loop = clock  # type: ignore[assignment]
    s2._reset_timeout()
    s2._reset_timeout(2)
    clock.now += 2
    clock.fire_due()
    assert closed == [40.0, 42.0]


def _session_log_run(monkeypatch, caplog, level):  # type: ignore[no-untyped-def]
    """An SMTP session against the gateway's protocol (aiosmtpd's command loop), with
    aiosmtpd's logger at ``level``; returns how often a line was sanitized, and the log."""

    import aiosmtpd.smtp as aiosmtpd_smtp
    from aiosmtpd.controller import Controller

    from mailgw.intake.smtp import protocol_factory
    from mailgw.settings import Listener
    from tests.conftest import free_port

    sanitized: list[bytes] = []
    real = aiosmtpd_smtp.sanitize

    def counting(text):  # type: ignore[no-untyped-def]
        sanitized.append(text)
        return real(text)

    monkeypatch.setattr(aiosmtpd_smtp, "sanitize", counting)

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            return "250 OK"

    handler, port = Handler(), free_port()

    class _Controller(Controller):
        def factory(self):  # type: ignore[no-untyped-def]
            return protocol_factory(Listener(), handler, "helpdesk.test", False)()

    caplog.set_level(level, logger="mail.log")
    ctl = _Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        with smtplib.SMTP("127.0.0.1", port) as c:
            c.ehlo()
            c.docmd("AUTH", "PLAIN c2VjcmV0")  # refused (no AUTH offered); logged, starred
            c.sendmail("x@customer.test", ["support@example.com"], b"Subject: s\r\n\r\nb\r\n")
    finally:
        ctl.stop()
    return sanitized, caplog.text


def test_session_command_lines_are_not_sanitized_for_log_calls_that_are_off(monkeypatch, caplog):
    # aiosmtpd logs each command line at debug and info, through its sanitizer
    import logging

    sanitized, text = _session_log_run(monkeypatch, caplog, logging.WARNING)
    assert sanitized == []
    assert "c2VjcmV0" not in text


def test_session_command_lines_are_still_logged_sanitized_when_on(monkeypatch, caplog):
    import logging

    sanitized, text = _session_log_run(monkeypatch, caplog, logging.DEBUG)
    assert any(line.startswith(b"AUTH") for line in sanitized)
    assert "FROM:<x@customer.test>" in text
    assert "AUTH PLAIN ********" in text and "c2VjcmV0" not in text
