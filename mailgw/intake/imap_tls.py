"""TLS for IMAP mailboxes: the SSL context (system CAs, or the mailbox's ``ca_file``), STARTTLS,
and errors that say which mailbox, which server and what failed.

Certificate verification is always on, the host name (or IP address) check included; there is
no switch to turn it off (docs/imap.md says why). A mailbox whose server has a certificate from
a private CA, or a self-signed one, names that CA (or the certificate) in ``ca_file``.

A TLS failure is a ``TLSError``, which is an ``AuthError``: like a refused login it is a
configuration problem rather than a network hiccup, so the poller logs it at ERROR on every
attempt, stores it for ``mailgw status`` and retries slowly; ``mailgw mailboxes check`` prints it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from mailgw.intake.imap_auth import AuthError, _answer
from mailgw.settings import Mailbox


class TLSError(AuthError):
    """No trusted TLS session: certificate not verified, STARTTLS not offered or refused, or
    the ``ca_file`` is unusable. The message names the mailbox and the server."""


def _where(mailbox: Mailbox) -> str:
    return f"{mailbox.host}:{mailbox.real_port} ({mailbox.tls})"


def ca_path(mailbox: Mailbox, base: Path) -> Path | None:
    """The mailbox's ``ca_file`` (relative paths are relative to the mailgw home)."""
    return None if mailbox.ca_file is None else base / mailbox.ca_file


def context(mailbox: Mailbox, base: Path) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only the mailbox's ``ca_file``."""
    path = ca_path(mailbox, base)
    if path is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        raise TLSError(f"mailbox {mailbox.name}: ca_file {path} holds no usable PEM "
                       f"certificate: {exc.reason or exc}") from None
    except OSError as exc:
        raise TLSError(f"mailbox {mailbox.name}: ca_file {path} cannot be read: "
                       f"{exc.strerror or exc}") from None


def verify_failed(mailbox: Mailbox, base: Path, exc: ssl.SSLCertVerificationError) -> TLSError:
    trusted = (f"the CA in ca_file {ca_path(mailbox, base)}" if mailbox.ca_file is not None
               else "the system's CAs (set ca_file to trust a private CA)")
    reason = exc.verify_message or exc.reason or str(exc)
    return TLSError(f"mailbox {mailbox.name}: TLS certificate of {_where(mailbox)} not trusted: "
                    f"certificate verify failed: {reason}; checked against {trusted}")


def starttls(client, mailbox: Mailbox, base: Path, ctx: ssl.SSLContext) -> None:  # type: ignore[no-untyped-def]
    """Upgrade a fresh plain connection with STARTTLS, or raise TLSError. Never falls back to
    a clear-text login."""
    from imapclient.exceptions import IMAPClientError

    caps = client.capabilities()  # pre-login: from the greeting or a CAPABILITY command
    if b"STARTTLS" not in caps:
        offered = " ".join(c.decode(errors="replace") for c in caps)
        raise TLSError(f"mailbox {mailbox.name}: {_where(mailbox)} does not offer STARTTLS "
                       f"(capabilities: {offered}); not logging in without TLS")
    try:
        client.starttls(ctx)
    except ssl.SSLCertVerificationError as exc:
        raise verify_failed(mailbox, base, exc) from None
    except IMAPClientError as exc:
        raise TLSError(f"mailbox {mailbox.name}: {_where(mailbox)} refused STARTTLS: "
                       f"{_answer(exc)}") from None
