"""A real Dovecot IMAP server on loopback for the IMAP intake tests.

``dovecot_server`` (session scope) starts Debian's dovecot with a test-only config: Maildir
under a temp dir, a passwd-file passdb with PLAIN passwords (plain auth allowed: it listens on
127.0.0.1 only), IMAP IDLE on. TLS with a throwaway CA made by the ``openssl`` CLI at session
start (``make_tls``): STARTTLS on the plain port, imaps on ``imaps_port``; the CA is
``ca_file``. ``dovecot_without_tls`` is a second server with ``ssl = no`` (no STARTTLS), started
only when a test asks for it. Each test gets its own user (``imap_user``), so
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
{ssl}
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
    address = 127.0.0.1 127.0.0.2
    port = {imaps_port}
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
    imaps_port: int = 0  # 0: no imaps listener (``dovecot_without_tls``)
    ca_file: Path | None = None  # the CA that signed the server's certificate

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


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1 and localhost, made
    with the ``openssl`` CLI. Returns (ca.pem, server.pem, server.key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make the test Dovecot's certificate")
    d.mkdir()
    ca, ca_key, cert, key, csr = (d / n for n in ("ca.pem", "ca.key", "server.pem",
                                                 "server.key", "server.csr"))
    ext = d / "server.ext"
    ext.write_text("basicConstraints = critical, CA:FALSE\n"
                   "keyUsage = critical, digitalSignature\n"
                   "extendedKeyUsage = serverAuth\n"
                   "subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for cmd in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=mailgw test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "2", "-out", cert, "-extfile", ext],
    ):
        proc = subprocess.run([openssl, *map(str, cmd)], capture_output=True)
        if proc.returncode != 0:
            pytest.fail(f"openssl {cmd[0]} failed: {proc.stderr.decode(errors='replace')}")
    for p in (ca, cert, key):
        os.chmod(p, 0o644)  # dovecot's processes may run as another user; a test-only key
    return ca, cert, key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dovecot(tls: bool) -> Iterator[Dovecot]:
    """Run one Dovecot for the session. With ``tls`` it offers STARTTLS on the plain port and
    imaps on ``imaps_port`` (127.0.0.1 and 127.0.0.2), with a certificate from ``make_tls``."""
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
    port = _free_port()
    imaps_port, ca = 0, None
    ssl_conf = "ssl = no"
    if tls:
        ca, cert, key = make_tls(root / "tls")
        imaps_port = _free_port()
        ssl_conf = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"
    conf = root / "dovecot.conf"
    conf.write_text(CONFIG.format(root=root, port=port, user=user, group=group, uid=uid, gid=gid,
                                  ssl=ssl_conf, imaps_port=imaps_port))
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    server = Dovecot(root, port, proc, imaps_port=imaps_port, ca_file=ca)
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


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[Dovecot]:
    """The test Dovecot: plain port with STARTTLS, and imaps (see ``start_dovecot``)."""
    yield from start_dovecot(tls=True)


@pytest.fixture(scope="session")
def dovecot_without_tls() -> Iterator[Dovecot]:
    """A second Dovecot with ``ssl = no``: it does not offer STARTTLS."""
    yield from start_dovecot(tls=False)


@pytest.fixture
def imap_user(dovecot_server: Dovecot) -> ImapUser:
    """A fresh IMAP account with an empty INBOX on the test Dovecot."""
    name = f"u{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex[:8]}"
    dovecot_server.add_user(name, password)
    return ImapUser(dovecot_server, name, password)
