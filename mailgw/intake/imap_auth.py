"""Logging in to an IMAP mailbox: LOGIN with a password (inline or from a file), or XOAUTH2
with a bearer token printed by a command or read from a file, refreshed before it expires.

Every failure says which mailbox, which step and what the server or the command answered:
a mailbox that cannot log in must be loud in the logs and in ``mailgw status``.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailgw.settings import Mailbox, OAuth2


class AuthError(Exception):
    """Logging in failed; the message names the mailbox and the server's (or token's) answer."""


class TokenError(AuthError):
    """No usable OAuth2 token could be obtained."""


def _answer(exc: BaseException) -> str:
    """The server's answer inside an imapclient/imaplib exception (or an OS error), as text."""
    if isinstance(exc, OSError):
        return str(exc) or type(exc).__name__
    arg = exc.args[0] if exc.args else exc
    if isinstance(arg, bytes):
        arg = arg.decode(errors="replace")
    text = str(arg).strip()
    # imapclient wraps some answers as the repr of bytes: b'[AUTHENTICATIONFAILED] ...'
    if len(text) > 3 and text[:2] in ("b'", 'b"') and text[-1] == text[1]:
        text = text[2:-1]
    return text


@dataclass
class TokenSource:
    """An OAuth2 access token, cached until ``refresh_before`` seconds ahead of its expiry."""

    config: OAuth2
    base: Path  # relative token files are read from the mailgw home
    _token: str | None = None
    _expires: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    fetches: int = 0  # how many times a token was obtained (shown in logs, used by tests)

    def _parse(self, text: str, what: str) -> tuple[str, float]:
        text = text.strip()
        if not text:
            raise TokenError(f"{what} gave an empty token")
        expires = time.time() + self.config.lifetime
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise TokenError(f"{what} gave invalid JSON: {exc}") from None
            token = data.get("access_token")
            if not isinstance(token, str) or not token:
                raise TokenError(f"{what} gave JSON without an access_token")
            if "expires_at" in data:
                expires = float(data["expires_at"])
            elif "expires_in" in data:
                expires = time.time() + float(data["expires_in"])
            return token, expires
        return text, expires

    def _fetch(self) -> tuple[str, float]:
        cfg = self.config
        if cfg.token_command:
            what = f"token_command {cfg.token_command!r}"
            try:
                proc = subprocess.run(["/bin/sh", "-c", cfg.token_command], capture_output=True,
                                      timeout=60, cwd=self.base)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise TokenError(f"{what} could not run: {exc}") from None
            if proc.returncode != 0:
                err = proc.stderr.decode(errors="replace").strip()[-500:]
                raise TokenError(f"{what} exited {proc.returncode}: {err or '(no output)'}")
            return self._parse(proc.stdout.decode(errors="replace"), what)
        path = self.base / str(cfg.token_file)
        what = f"token_file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenError(f"{what} cannot be read: {exc.strerror or exc}") from None
        return self._parse(text, what)

    def token(self) -> str:
        with self._lock:
            if self._token is None or self.expiring():
                self._token, self._expires = self._fetch()
                self.fetches += 1
            return self._token

    def expiring(self) -> bool:
        """True when the token should be replaced now (refresh window reached)."""
        return self._token is not None and time.time() >= self._expires - self.config.refresh_before

    def invalidate(self) -> None:
        with self._lock:
            self._token = None


class Credentials:
    """How one mailbox logs in."""

    def __init__(self, mailbox: Mailbox, base: Path):
        self.mailbox = mailbox
        self.base = base
        self.tokens = TokenSource(mailbox.oauth2, base) if mailbox.oauth2 else None

    @property
    def method(self) -> str:
        return "XOAUTH2" if self.tokens else "LOGIN"

    def password(self) -> str:
        mb = self.mailbox
        if mb.password is not None:
            return mb.password
        path = self.base / str(mb.password_file)
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise AuthError(f"mailbox {mb.name}: password_file {path} cannot be read: "
                            f"{exc.strerror or exc}") from None

    def login(self, client) -> None:  # type: ignore[no-untyped-def]
        """Log in on a connected IMAPClient; raises AuthError saying what the server said."""
        from imapclient.exceptions import LoginError

        mb = self.mailbox
        try:
            if self.tokens is not None:
                try:
                    token = self.tokens.token()
                except TokenError as exc:
                    raise AuthError(f"mailbox {mb.name}: no OAuth2 token: {exc}") from None
                client.oauth2_login(mb.username, token)
            else:
                client.login(mb.username, self.password())
        except LoginError as exc:
            if self.tokens is not None:
                self.tokens.invalidate()  # the next attempt gets a fresh token
            raise AuthError(f"mailbox {mb.name}: {self.method} as {mb.username} on "
                            f"{mb.host}:{mb.real_port} refused: {_answer(exc)}") from None

    def needs_relogin(self) -> bool:
        """An OAuth2 session is renewed with a fresh token before the old one expires."""
        return self.tokens is not None and self.tokens.expiring()
