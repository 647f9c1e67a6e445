"""IMAP logins: XOAUTH2 against the test Dovecot (its XOAUTH2 mechanism hands the bearer token
to the passdb, so an account whose password is the token accepts it; Dovecot does not check
expiry or scopes, so the refresh logic is tested by counting token fetches), a password file,
failures that say what went wrong, and mailbox config validation."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from mailgw.intake import ledger
from mailgw.intake.imap import Poller
from mailgw.intake.imap_auth import TokenSource
from mailgw.settings import ConfigError, Home, OAuth2, load_settings
from tests.conftest import wait_until
from tests.helpers import Harness, mail


def token_command(tmp: Path, token: str, expires_in: int) -> str:
    """A shell command printing a JSON token and counting its runs in ``calls``."""
    script = tmp / "token.sh"
    script.write_text(f"#!/bin/sh\necho run >> {tmp / 'calls'}\n"
                      f"printf '{{\"access_token\": \"{token}\", \"expires_in\": {expires_in}}}'\n")
    script.chmod(0o755)
    return str(script)


def runs(tmp: Path) -> int:
    p = tmp / "calls"
    return len(p.read_text().splitlines()) if p.exists() else 0


def test_token_cached_until_the_refresh_window(tmp_path):
    long = TokenSource(OAuth2(token_command=token_command(tmp_path, "t1", 3600),
                              refresh_before=300), tmp_path)
    assert long.token() == "t1" and long.token() == "t1"
    assert runs(tmp_path) == 1 and not long.expiring()
    (tmp_path / "calls").unlink()
    # A token valid for less than refresh_before is replaced on every use.
    short = TokenSource(OAuth2(token_command=token_command(tmp_path, "t2", 200),
                               refresh_before=300), tmp_path)
    assert short.token() == "t2" and short.expiring()
    assert short.token() == "t2"
    assert runs(tmp_path) == 2


def test_token_file_json_expiry_and_errors(tmp_path):
    f = tmp_path / "token.json"
    f.write_text(json.dumps({"access_token": "abc", "expires_at": time.time() + 30}))
    src = TokenSource(OAuth2(token_file="token.json", refresh_before=60), tmp_path)
    assert src.token() == "abc" and src.expiring()
    f.write_text("   ")
    with pytest.raises(Exception, match=r"token_file .*token.json gave an empty token"):
        src.token()
    bad = TokenSource(OAuth2(token_command="echo nope >&2; exit 3"), tmp_path)
    with pytest.raises(Exception, match=r"exited 3: nope"):
        bad.token()


def test_xoauth2_login_reads_mail_and_relogs_before_expiry(home, dovecot_server, tmp_path):
    user = "oauth-user@example.test"
    dovecot_server.add_user(user, "tok-good")
    dovecot_server.client(user).append("INBOX", mail("Via OAuth2"))
    # A token that enters its refresh window one second after it is issued.
    cmd = token_command(tmp_path, "tok-good", 301)
    home.update_config(mailboxes=[{
        "name": "oauth-box", "host": "127.0.0.1", "port": dovecot_server.port, "tls": "plain",
        "username": user, "oauth2": {"token_command": cmd, "refresh_before": 300},
        "queue": "support", "poll_interval": 0.3, "idle": False}])
    check = home.cli("mailboxes", "check")
    assert check.returncode == 0, check.stderr.decode()
    assert "folder INBOX: 1 messages" in check.stdout.decode()
    h = Harness(home)
    stop = threading.Event()
    poller = Poller(h.engine, h.settings.mailboxes[0], home.path, stop)
    t = threading.Thread(target=poller.run)
    t.start()
    try:
        wait_until(lambda: h.pending() == 1, what="message queued over XOAUTH2")
        # Each session ends before the token expires and the next logs in with a new one.
        wait_until(lambda: poller.creds.tokens.fetches >= 3, timeout=20, what="token refreshes")
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert runs(tmp_path) >= 3
    assert sum("oauth-user@example.test" in line and "Login:" in line
               for line in dovecot_server.log().splitlines()) >= 3
    assert ledger.mailbox_statuses(h.engine)[0]["last_error"] is None
    h.close()


def test_xoauth2_refused_token_and_failing_command_are_specific(home, dovecot_server, tmp_path):
    user = "oauth-bad@example.test"
    dovecot_server.add_user(user, "tok-right")
    base = {"host": "127.0.0.1", "port": dovecot_server.port, "tls": "plain", "username": user,
            "queue": "support"}
    (home.path / "token.txt").write_text("tok-wrong\n")
    home.update_config(mailboxes=[
        {**base, "name": "wrong-token", "oauth2": {"token_file": "token.txt"}},
        {**base, "name": "broken-cmd",
         "oauth2": {"token_command": "echo 'refresh token revoked' >&2; exit 2"}},
    ])
    proc = home.cli("mailboxes", "check")
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "wrong-token: FAILED: mailbox wrong-token: XOAUTH2 as oauth-bad@example.test" in err
    assert "AUTHENTICATIONFAILED" in err
    assert "broken-cmd: FAILED: mailbox broken-cmd: no OAuth2 token:" in err
    assert "exited 2: refresh token revoked" in err


def test_password_file(home, imap_user):
    from mailgw.intake.imap import check
    from mailgw.intake.imap_auth import AuthError

    (home.path / "secret").write_text(imap_user.password + "\n")
    cfg = imap_user.mailbox_config(password_file="secret")
    del cfg["password"]
    home.update_config(mailboxes=[cfg])
    mb = home.settings().mailboxes[0]
    caps, folders = check(mb, home.path)
    assert "IDLE" in caps and [(f.folder, f.messages) for f in folders] == [("INBOX", 0)]
    (home.path / "secret").unlink()
    with pytest.raises(AuthError, match=r"password_file .*secret cannot be read: No such file"):
        check(mb, home.path)


@pytest.mark.parametrize(("box", "reason"), [
    ({"host": "mail.example.com", "tls": "plain", "password": "x"},
     "tls: plain sends the password in clear"),
    ({"host": "mail.example.com", "password": "x", "oauth2": {"token_file": "t"}},
     "give exactly one of password, password_file or oauth2"),
    ({"host": "mail.example.com", "oauth2": {"token_file": "t", "token_command": "c"}},
     "give exactly one of token_command or token_file"),
    ({"host": "mail.example.com", "password": "x", "after": "archive"},
     "mailboxes[0].after: Input should be 'move', 'flag' or 'delete'"),
    ({"host": "mail.example.com", "password": "x", "queue": "nope"},
     "mailbox box: queue 'nope' is not a configured queue"),
])
def test_bad_mailbox_config_is_refused_with_line(tmp_path, box, reason):
    from mailgw.home import init_home

    init_home(tmp_path / "h")
    cfg = tmp_path / "h" / "config" / "mailgw.yaml"
    entry = {"name": "box", "username": "u", "queue": "support", **box}
    cfg.write_text(cfg.read_text() + "\nmailboxes:\n  - " + json.dumps(entry) + "\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(Home(tmp_path / "h"))
    text = str(exc.value)
    assert reason in text
    assert "mailgw.yaml:" in text


def test_check_names_an_unreachable_server(home):
    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    home.update_config(mailboxes=[{"name": "nowhere", "host": "127.0.0.1", "port": port,
                                   "tls": "plain", "username": "u", "password": "p",
                                   "queue": "support"}])
    proc = home.cli("mailboxes", "check", "--json")
    assert proc.returncode == 1
    [r] = json.loads(proc.stdout)
    assert r["ok"] is False and r["mailbox"] == "nowhere"
    assert r["error"] == (f"mailbox nowhere: cannot connect to 127.0.0.1:{port} (plain): "
                          "ConnectionRefusedError: [Errno 111] Connection refused")
