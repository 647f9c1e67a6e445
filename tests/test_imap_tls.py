"""IMAP over TLS against the test Dovecot (tests/imap_server.py): imaps and STARTTLS with a
private CA given as ``ca_file``, and the specific errors when the certificate is not trusted
(unknown CA, wrong host), when the server does not offer STARTTLS, and when ``ca_file`` is
unusable: in ``mailgw mailboxes check`` and in ``mailgw status``."""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import threading

import pytest

from mailgw.intake import ledger
from mailgw.intake.imap import Poller, connect
from mailgw.settings import ConfigError, Home, load_settings
from tests.conftest import wait_until
from tests.helpers import Harness, mail


def logins(server, user: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Dovecot's log lines for successful logins of ``user``."""
    return [line for line in server.log().splitlines()
            if f"Login: user=<{user}>," in line]


@pytest.mark.parametrize("tls", ["imaps", "starttls"])
def test_tls_with_ca_file_mail_becomes_tickets(home, imap_user, tls):
    # Given the server's CA in the home and two mails in INBOX
    server = imap_user.server
    shutil.copy(server.ca_file, home.path / "private-ca.pem")
    port = server.imaps_port if tls == "imaps" else server.port
    home.update_config(mailboxes=[imap_user.mailbox_config(tls=tls, port=port,
                                                           ca_file="private-ca.pem")])
    check = home.cli("mailboxes", "check")
    assert check.returncode == 0, check.stderr.decode()
    assert f"logged in to 127.0.0.1:{port} ({tls})" in check.stdout.decode()
    imap_user.append(mail("Over TLS 1", msgid=f"{tls}1@customer.test"),
                     mail("Over TLS 2", msgid=f"{tls}2@customer.test"))
    h = Harness(home)
    p = Poller(h.engine, h.settings.mailboxes[0], home.path, threading.Event())
    assert ledger.acquire_lease(p.engine, p.mb.name, p.me, p.lease) is None
    # When the poller reads it
    client = connect(p.mb, p.creds)
    try:
        # Then the session is TLS (not a clear-text session that happens to work)
        sock = client._imap.sock
        assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")
        assert p.poll_once(client) == 2
    finally:
        client.logout()
    h.drain()
    # And the mail became tickets and moved; Dovecot saw TLS logins only
    assert sorted(t.title for t in h.tickets()) == ["Over TLS 1", "Over TLS 2"]
    assert imap_user.uids("INBOX") == [] and len(imap_user.uids("Processed")) == 2
    # (the test's own appends and uids() log in over plain loopback: "secured", not "TLS")
    assert sum(", TLS," in line for line in logins(server, imap_user.name)) == 2  # check+poll
    h.close()


def test_untrusted_certificate_fails_check_and_shows_in_status(home, imap_user, caplog):
    # Given an imaps and a starttls mailbox without the private CA, and one with the CA that
    # connects by an address the certificate is not for (127.0.0.2; it holds 127.0.0.1)
    server = imap_user.server
    shutil.copy(server.ca_file, home.path / "ca.pem")
    home.update_config(mailboxes=[
        imap_user.mailbox_config(name="no-ca", tls="imaps", port=server.imaps_port),
        imap_user.mailbox_config(name="no-ca-starttls", tls="starttls", port=server.port),
        imap_user.mailbox_config(name="wrong-host", host="127.0.0.2", tls="imaps",
                                 port=server.imaps_port, ca_file="ca.pem"),
    ])
    # When checked
    proc = home.cli("mailboxes", "check")
    # Then it fails naming each mailbox, the server and the verify failure
    assert proc.returncode == 1
    err = proc.stderr.decode().splitlines()
    p, sp = server.imaps_port, server.port
    assert err == [
        f"no-ca: FAILED: mailbox no-ca: TLS certificate of 127.0.0.1:{p} (imaps) not trusted: "
        "certificate verify failed: unable to get local issuer certificate; checked against "
        "the system's CAs (set ca_file to trust a private CA)",
        f"no-ca-starttls: FAILED: mailbox no-ca-starttls: TLS certificate of 127.0.0.1:{sp} "
        "(starttls) not trusted: certificate verify failed: unable to get local issuer "
        "certificate; checked against the system's CAs (set ca_file to trust a private CA)",
        f"wrong-host: FAILED: mailbox wrong-host: TLS certificate of 127.0.0.2:{p} (imaps) not "
        "trusted: certificate verify failed: IP address mismatch, certificate is not valid for "
        f"'127.0.0.2'.; checked against the CA in ca_file {home.path / 'ca.pem'}",
    ]
    assert proc.stdout.decode() == ""
    assert logins(server, imap_user.name) == []  # no password went to an untrusted server
    # And a running poller says so loudly, in the log and in `mailgw status`
    h = Harness(home)
    stop = threading.Event()
    poller = Poller(h.engine, h.settings.mailboxes[0], home.path, stop)
    t = threading.Thread(target=poller.run)
    with caplog.at_level(logging.ERROR, logger="mailgw.intake.imap"):
        t.start()
        try:
            wait_until(lambda: ledger.mailbox_statuses(h.engine), what="error recorded")
        finally:
            stop.set()
            t.join(10)
    assert not t.is_alive()
    assert any("mailbox no-ca: TLS certificate of" in r.getMessage()
               and r.levelno == logging.ERROR for r in caplog.records)
    data = json.loads(home.cli("status", "--json", check=True).stdout)
    box = next(b for b in data["mailboxes"] if b["mailbox"] == "no-ca")
    assert box["last_ok_at"] is None
    assert box["last_error"] == err[0].removeprefix("no-ca: FAILED: ")
    text = home.cli("status", check=True).stdout.decode()
    assert f"mailbox no-ca (127.0.0.1:{p} -> queue support): ERROR" in text
    assert "certificate verify failed: unable to get local issuer certificate" in text
    h.close()


def test_starttls_not_offered_and_unusable_ca_file(home, dovecot_without_tls, tmp_path):
    # Given a server without STARTTLS (ssl = no), and mailboxes whose ca_file is missing or
    # not a certificate
    server = dovecot_without_tls
    server.add_user("tls-user", "secret")
    (home.path / "garbage.pem").write_text("not a certificate\n")
    base = {"host": "127.0.0.1", "username": "tls-user", "password": "secret",
            "queue": "support"}
    home.update_config(mailboxes=[
        {**base, "name": "no-starttls", "tls": "starttls", "port": server.port},
        {**base, "name": "missing-ca", "tls": "imaps", "port": server.port,
         "ca_file": "missing.pem"},
        {**base, "name": "bad-ca", "tls": "starttls", "port": server.port,
         "ca_file": "garbage.pem"},
    ])
    proc = home.cli("mailboxes", "check", "--json")
    assert proc.returncode == 1
    errors = {r["mailbox"]: r["error"] for r in json.loads(proc.stdout)}
    assert errors["no-starttls"].startswith(
        f"mailbox no-starttls: 127.0.0.1:{server.port} (starttls) does not offer STARTTLS "
        "(capabilities: IMAP4REV1")
    assert errors["no-starttls"].endswith("); not logging in without TLS")
    assert "STARTTLS" not in errors["no-starttls"].split("(capabilities:")[1]
    assert errors["missing-ca"] == (f"mailbox missing-ca: ca_file {home.path / 'missing.pem'} "
                                    "cannot be read: No such file or directory")
    assert errors["bad-ca"].startswith(
        f"mailbox bad-ca: ca_file {home.path / 'garbage.pem'} holds no usable PEM certificate:")
    # The password was never sent in clear to the server without STARTTLS
    assert logins(server, "tls-user") == []
    assert "tls-user" not in server.log()


def test_ca_file_with_plain_tls_is_refused_with_line(tmp_path):
    from mailgw.home import init_home

    init_home(tmp_path / "h")
    cfg = tmp_path / "h" / "config" / "mailgw.yaml"
    entry = {"name": "box", "host": "127.0.0.1", "tls": "plain", "username": "u",
             "password": "p", "queue": "support", "ca_file": "ca.pem"}
    cfg.write_text(cfg.read_text() + "\nmailboxes:\n  - " + json.dumps(entry) + "\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(Home(tmp_path / "h"))
    assert "ca_file is for tls: imaps or starttls; tls: plain has no TLS" in str(exc.value)
    assert "mailgw.yaml:" in str(exc.value)
