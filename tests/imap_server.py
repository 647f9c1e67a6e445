"""A real Dovecot IMAP server on loopback for the IMAP intake tests.

``dovecot_server`` (session scope) starts Debian's dovecot with a test-only config: Maildir
under a temp dir, a passwd-file passdb with PLAIN passwords (plain auth allowed, no TLS: it
listens on 127.0.0.1 only), IMAP IDLE on. Each test gets its own user (``imap_user``), so
tests never see each other's mail. When dovecot is not installed the tests skip, unless
``MAILGW_REQUIRE_IMAP=1`` (as in CI), where they fail.

XOAUTH2: Dovecot 2.3's XOAUTH2 mechanism hands the bearer token to the passdb as the
password, so a user whose passwd-file password is a token logs in with that token over
XOAUTH2 (and not over LOGIN, where tests check the plumbing only: see test_imap_auth.py).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DOVECOT = shutil.which("dovecot") or (
    "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)

CONFIG = """\
instance_name = mailgw-test-{port}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
mail_location = maildir:{root}/mail/%u
mail_max_userip_connections = 100
first_valid_uid = 0
auth_failure_delay = 0
imap_idle_notify_interval = 1 secs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users/%u
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


@dataclass
class Dovecot:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    users: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"

    def add_user(self, name: str, password: str) -> None:
        # One passwd-file per user: a new file is read at once (an edited one only when its
        # mtime changes, which may be within the same second).
        self.users[name] = password
        path = self.root / "users" / name
        path.write_text(f"{name}:{{PLAIN}}{password}\n")
        os.chmod(path, 0o644)

    def client(self, user: str, password: str | None = None):  # type: ignore[no-untyped-def]
        from imapclient import IMAPClient

        c = IMAPClient(self.host, port=self.port, ssl=False, timeout=30)
        c.login(user, password or self.users[user])
        return c

    def log(self) -> str:
        p = self.root / "dovecot.log"
        return p.read_text(errors="replace") if p.exists() else ""


@dataclass
class ImapUser:
    server: Dovecot
    name: str
    password: str

    def client(self):  # type: ignore[no-untyped-def]
        return self.server.client(self.name, self.password)

    def append(self, *raws: bytes, folder: str = "INBOX") -> None:
        with self.client() as c:
            for raw in raws:
                c.append(folder, raw)

    def uids(self, folder: str = "INBOX") -> list[int]:
        with self.client() as c:
            if not c.folder_exists(folder):
                return []
            c.select_folder(folder, readonly=True)
            return sorted(c.search("ALL"))

    def mailbox_config(self, **over) -> dict:  # type: ignore[no-untyped-def]
        cfg = {"name": f"mb-{self.name}", "host": self.server.host, "port": self.server.port,
               "tls": "plain", "username": self.name, "password": self.password,
               "queue": "support", "poll_interval": 1}
        cfg.update(over)
        return cfg


def _identity() -> tuple[str, str, int, int]:
    """Who dovecot's processes and the mail files belong to: ourselves when unprivileged;
    the package's ``dovecot`` user when we run as root (Dovecot refuses root for mail)."""
    if os.getuid() != 0:
        pw = pwd.getpwuid(os.getuid())
        import grp

        return pw.pw_name, grp.getgrgid(os.getgid()).gr_name, os.getuid(), os.getgid()
    try:
        pw = pwd.getpwnam("dovecot")
    except KeyError:
        pw = pwd.getpwnam("nobody")
    import grp

    return pw.pw_name, grp.getgrgid(pw.pw_gid).gr_name, pw.pw_uid, pw.pw_gid


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[Dovecot]:
    if DOVECOT is None:
        reason = "dovecot is not installed (apt-get install dovecot-imapd)"
        if os.environ.get("MAILGW_REQUIRE_IMAP") == "1":
            pytest.fail(f"IMAP tests required (MAILGW_REQUIRE_IMAP=1) but {reason}")
        pytest.skip(reason)
    # Not under pytest's basetemp: pytest (ours or a parallel run) keeps that 0700, and
    # dovecot's auth and mail processes run as the dovecot user when we are root.
    root = Path(tempfile.mkdtemp(prefix="mailgw-dovecot-"))
    user, group, uid, gid = _identity()
    for d in ("run", "state", "mail", "home", "users"):
        (root / d).mkdir()
    os.chmod(root, 0o755)
    if os.getuid() == 0:
        for d in ("mail", "home"):
            os.chown(root / d, uid, gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = root / "dovecot.conf"
    conf.write_text(CONFIG.format(root=root, port=port, user=user, group=group, uid=uid, gid=gid))
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    server = Dovecot(root, port, proc)
    deadline = time.monotonic() + 20
    # Tests fail logins on purpose; Dovecot's per-IP auth penalty would then delay the next
    # login from 127.0.0.1 (even a good one) by seconds. The auth process disables the
    # penalty silently when anvil's penalty socket is missing: remove it before the first
    # login starts that process.
    penalty = root / "run" / "anvil-auth-penalty"
    while not penalty.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    penalty.unlink(missing_ok=True)
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"dovecot exited {proc.returncode}: {out}\n{server.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"* OK"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"dovecot did not answer on port {port}:\n{server.log()}")
        time.sleep(0.1)
    yield server
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def imap_user(dovecot_server: Dovecot) -> ImapUser:
    """A fresh IMAP account with an empty INBOX on the test Dovecot."""
    name = f"u{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex[:8]}"
    dovecot_server.add_user(name, password)
    return ImapUser(dovecot_server, name, password)
