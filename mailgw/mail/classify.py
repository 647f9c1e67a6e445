"""One classifier for incoming mail: what kind of mail it is, and the evidence for it.

Classes (``Classification.kind``):

``own_loop``        our own outgoing mail came back: a Message-ID we signed, our VERP
                    envelope sender, or our loop header naming one of our addresses.
``bounce``          a delivery failure report: RFC 3464 DSN or a non-standard MTA bounce.
``delay``           a delivery report saying only that delivery is still being retried.
``feedback_report`` an ARF abuse complaint (RFC 5965, ``report-type=feedback-report``).
``out_of_office``   an automatic answer saying the person is away.
``auto_reply``      any other automatic mail: RFC 3834 ``Auto-Submitted``, ``X-Autoreply``,
                    ``X-Autorespond``, ``X-Auto-Response-Suppress``, ``Precedence:
                    bulk/junk``, a loop header, a vacation subject, a no-reply sender,
                    a null return path, read receipts.
``list``            mail distributed by a mailing list (``List-Id``, ``Precedence: list``…).
``human``           none of the above.

Order matters and is fixed: own loop first (nothing of ours may ever be answered), then
bounces (about 260 real bounces in the corpus also say ``Auto-Submitted: auto-replied``),
feedback reports, out of office and auto-replies, lists. The evidence lists every signal
found, strongest first; ``reason`` is the first one, a short single line for logs.

The hot path stays cheap: every pattern is compiled at import, a human message costs a
few dictionary look-ups and one subject regex, and a bounce's body is only read (with
``mailgw.mail.bounce``) when its headers already point at a delivery report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailgw.mail.bounce import BounceReport, read_bounce
from mailgw.types import ParsedMail

__all__ = ["AUTOMATIC", "Classification", "Ours", "classify"]

AUTOMATIC = frozenset({"own_loop", "bounce", "delay", "feedback_report", "out_of_office",
                       "auto_reply", "list"})

_MAILER_DAEMON = re.compile(r"mailer[-_.]?daemon|m[-_]?daemon", re.IGNORECASE)
_DAEMON_LOCALS = frozenset({"postmaster", "ndr", "mail.delivery.system", "maildelivery",
                            "mail-delivery-system", "mail.delivery.subsystem", "mailadm",
                            "e500_smtp_mail_service", "bounce", "bounces"})
_DAEMON_NAME = re.compile(r"mail delivery (sub)?system|mailer[-_ ]?daemon|postmaster|"
                          r"delivery status notification", re.IGNORECASE)
# no-reply, noreply, no_reply, do-not-reply, donotreply..., also as a suffix
# ("billing-noreply"), but not inside a word.
_NO_REPLY = re.compile(r"(?:^|[^a-z])(?:no|do[-_.]?not)[-_.]?reply", re.IGNORECASE)
_SUPPRESSED = frozenset({"all", "oof", "autoreply"})
# RFC 3834 §2 names bulk, junk and list; "auto_reply" is what some autoresponders send.
_BULK_PRECEDENCE = frozenset({"bulk", "junk", "auto_reply"})
_NEGATIVE = frozenset({"no", "false", "0"})
_PARAMETER = re.compile(r"""report-type\s*=\s*"?([^";\s]+)""", re.IGNORECASE)
_COMMENT = re.compile(r"\([^()]*\)")
_ANGLE_ADDR = re.compile(r"<([^<>]*)>")
_REPLY_PREFIX = re.compile(r"^\s*(?:re|aw|sv|vs|ref|rif|antw|odp|fw|fwd|wg|tr|rv|doorst)"
                           r"\s*(?:\[\d+\])?\s*:", re.IGNORECASE)

# Subjects of delivery reports, as MTAs write them (checked only at the start, after no
# Re:/Fwd: prefix: a person forwarding a bounce to us is a customer with a question).
_BOUNCE_SUBJECT = re.compile(
    r"^\s*(?:\[postmaster\]\s*)?(?:"
    r"undeliver|undelivered|non[- ]?deliver|not delivered|delivery (?:status )?(?:notification|"
    r"failure|failed|report|problem|error|has failed)|delivery status|failure (?:notice|delivery)|"
    r"failed mail|returned mail|mail (?:delivery|system) (?:failed|failure|error|problem|warning)|"
    r"mail delivery failure|mail(?: could)? not (?:be )?delivered|could not be delivered|"
    r"message (?:delivery failure|delayed|not delivered|undeliverable)|delayed mail|"
    r"warning: (?:message|could not send)|permanent delivery failure|email delivery (?:error|failure)|"
    r"mail error|processing error|returned mail|automatically rejected mail|"
    r"unzustellbar|nicht zustellbar|(?:é|e)chec de (?:la )?(?:remise|distribution)|non remis|"
    r"no se (?:puede|pudo) entregar|non recapitabile|onbestelbaar|nie dostarczono|"
    r"ваше сообщение не доставлено|не доставлено|邮件传输失败|配信不能|送信エラー"
    r")", re.IGNORECASE)
_DELAY_SUBJECT = re.compile(r"delay|still being retried|not yet been delivered|"
                            r"could not send message for past", re.IGNORECASE)
# Subjects saying the person is away, in common languages; at the start, or anywhere in
# mail whose headers already say it is automatic.
_OOO = (r"out of (?:the )?office|ooo\b|on vacation|vacation (?:reply|message|notice)|"
        r"away from (?:the |my )?(?:office|desk)|on (?:annual |parental |sick )?leave|"
        r"abwesenheit|abwesend|nicht im büro|außer haus|"
        r"absence|absent|en congés?|hors du bureau|"
        r"fuera de (?:la )?oficina|ausente|ausencia|"
        r"fuori (?:sede|ufficio)|assente|"
        r"afwezig|niet aanwezig|buiten kantoor|"
        r"frånvar|fraværende|fravær|ikke på kontoret|poissa|lomalla|"
        r"ausência|fora do escritório|"
        r"nieobecn|poza biurem|mimo kancelář|nepřítomn|"
        r"вне офиса|отсутств|нет на месте|в отпуске|"
        r"不在|外出中|休暇|不在办公室|休假|"
        r"ofis dışı|izindeyim")
_OOO_SUBJECT_START = re.compile(rf"^\s*(?:automatic reply|auto(?:matic)?[- ]?reply|autoreply)?"
                                rf"\s*:?\s*(?:{_OOO})", re.IGNORECASE)
_OOO_TEXT = re.compile(_OOO)  # searched in lower-cased text
_ANSWER_EVIDENCE = ("Auto-Submitted", "X-Auto", "X-Mail-Autoreply", "X-Vacation",
                    "subject of an automatic reply")
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:auto(?:matic)?[- ]?(?:reply|response|answer)|autoreply|autoresponse|"
    r"automatische antwort|automatische reactie|automatisch antwoord|"
    r"r(?:é|e)ponse automatique|respuesta autom(?:á|a)tica|risposta automatica|"
    r"resposta autom(?:á|a)tica|autosvar|automatiskt svar|automatisk svar|"
    r"automaattinen vastaus|odpowied(?:ź|z) automatyczna|automatyczna odpowied(?:ź|z)|"
    r"automatická odpověď|автоматический ответ|автоответ|自動応答|自動返信|自动回复|自動回覆|"
    r"otomatik yanıt|read:|read receipt|lu :|gelesen:|delivered:)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Ours:
    """What identifies our own outgoing mail; built once per settings, not per message."""

    addresses: frozenset[str] = frozenset()
    loop_header: str = "X-Loop"
    # Checks a Message-ID / VERP address; None when nothing is signed (tests, old config).
    is_our_message_id: object = None  # Callable[[str], bool]
    verp_article: object = None  # Callable[[str], int | None]


@dataclass(frozen=True, slots=True)
class Classification:
    kind: str
    evidence: tuple[str, ...] = ()
    bounce: BounceReport | None = None
    verp_article_id: int | None = None  # the article a VERP recipient names, when valid
    extra: dict = field(default_factory=dict)

    @property
    def automatic(self) -> bool:
        return self.kind != "human"

    @property
    def reason(self) -> str | None:
        """The strongest evidence, or None for human mail."""
        if self.kind == "human":
            return None
        return self.evidence[0] if self.evidence else self.kind


def _first_token(value: str) -> str:
    """The keyword of a header value, without parameters or comments ("auto-replied")."""
    return _COMMENT.sub(" ", value).split(";", 1)[0].strip().lower()


def _local_part(address: str) -> str:
    return address.strip().strip("<>").rsplit("@", 1)[0].lower()


def _short(value: str, limit: int = 80) -> str:
    """Header values come from strangers and end up in logs: keep them on one short line."""
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _senders(parsed: ParsedMail, mail_from: str | None) -> list[str]:
    """Envelope sender, Return-Path (the envelope sender as recorded at delivery), From."""
    value = parsed.header("return-path") or ""
    bracketed = _ANGLE_ADDR.search(value)
    return_path = bracketed.group(1) if bracketed else value
    candidates = [mail_from or "", return_path, parsed.from_addr]
    return [address for address in candidates if address.strip()]


def is_daemon(address: str) -> bool:
    local = _local_part(address)
    return bool(_MAILER_DAEMON.fullmatch(local) or local in _DAEMON_LOCALS)


def unanswerable(address: str) -> bool:
    """True for an address that must never get an automatic answer (MAILER-DAEMON,
    postmaster, no-reply…), e.g. a Reply-To pointing at one."""
    local = _local_part(address)
    return bool(_MAILER_DAEMON.fullmatch(local) or local == "postmaster"
                or _NO_REPLY.search(local))


def _own_loop(parsed: ParsedMail, mail_from: str | None, ours: Ours) -> list[str]:
    evidence = []
    check = ours.is_our_message_id
    if check is not None and parsed.message_id and check(parsed.message_id):
        evidence.append(f"Message-ID is one we signed ({_short(parsed.message_id)})")
    verp = ours.verp_article
    if verp is not None and mail_from and verp(mail_from) is not None:
        evidence.append(f"envelope sender is our VERP address ({_short(mail_from)})")
    for name in dict.fromkeys(("X-Loop", ours.loop_header)):
        for value in parsed.headers.get(name.lower(), ()):
            found = {a.lower() for a in re.findall(r"[^\s<>,;\"']+@[^\s<>,;\"']+", value)}
            if found & ours.addresses:
                evidence.append(f"{name} names our address ({_short(value)})")
    return evidence


def _report_type(parsed: ParsedMail) -> tuple[str | None, set[str]]:
    content_type = parsed.header("content-type") or ""
    part_types = {a.content_type for a in parsed.attachments if a.content_type.startswith(
        ("message/", "text/rfc822-headers"))}
    if _first_token(content_type) == "multipart/report":  # RFC 6522: DSN, MDN, ARF
        found = _PARAMETER.search(content_type)
        if found:
            return found.group(1).lower(), part_types
        if "message/feedback-report" in part_types:
            return "feedback-report", part_types
        if "message/disposition-notification" in part_types:
            return "disposition-notification", part_types
        return "report", part_types
    if _first_token(content_type) in ("message/delivery-status", "message/feedback-report"):
        return _first_token(content_type).split("/")[1], part_types
    return None, part_types


def _auto_reply_evidence(parsed: ParsedMail, loop_header: str) -> list[str]:
    evidence = []
    auto_submitted = parsed.header("auto-submitted")
    if auto_submitted is not None and _first_token(auto_submitted) != "no":  # RFC 3834 §5
        evidence.append(f"Auto-Submitted: {_short(auto_submitted) or '(empty)'}")
    for name in ("X-Autoreply", "X-Autorespond", "X-Autogenerated", "X-AutoReply-From",
                 "X-Mail-Autoreply", "X-Vacation"):
        value = parsed.header(name)
        if value is not None and _first_token(value) not in _NEGATIVE:
            evidence.append(f"{name}: {_short(value) or '(empty)'}")
    # Microsoft's header, set on auto-replies so that they do not trigger more of them.
    suppress = parsed.header("x-auto-response-suppress")
    if suppress is not None:
        values = {v.strip().lower() for v in suppress.split(",")}
        if values & _SUPPRESSED:
            evidence.append(f"X-Auto-Response-Suppress: {_short(suppress)}")
    precedence = parsed.header("precedence")
    if precedence is not None and _first_token(precedence) in _BULK_PRECEDENCE:
        evidence.append(f"Precedence: {_first_token(precedence)}")
    for name in dict.fromkeys(("X-Loop", loop_header)):  # ours may be configured otherwise
        value = parsed.header(name)
        if value is not None:
            evidence.append(f"{name}: {_short(value) or '(empty)'}")
    return evidence


def _list_evidence(parsed: ParsedMail) -> list[str]:
    evidence = []
    precedence = parsed.header("precedence")
    if precedence is not None and _first_token(precedence) == "list":
        evidence.append("Precedence: list")
    # RFC 2919 List-Id and RFC 2369 List-* headers: the message went to a list.
    list_id = parsed.header("list-id")
    if list_id is not None:
        evidence.append(f"mailing list (List-Id: {_short(list_id)})")
    elif parsed.header("list-unsubscribe") is not None:
        evidence.append("mailing list (List-Unsubscribe present)")
    elif parsed.header("list-post") is not None or parsed.header("mailing-list") is not None:
        evidence.append("mailing list (List-Post/Mailing-List present)")
    return evidence


def _verp_article(rcpt_tos: tuple[str, ...] | list[str], ours: Ours) -> int | None:
    verp = ours.verp_article
    if verp is None:
        return None
    for rcpt in rcpt_tos:
        article = verp(rcpt)
        if article is not None:
            return article
    return None


def classify(parsed: ParsedMail, mail_from: str | None, *, raw: bytes | None = None,
             rcpt_tos: tuple[str, ...] | list[str] = (), ours: Ours | None = None) -> Classification:
    """Classify one parsed message.

    ``mail_from`` is the envelope sender ("" for the null reverse-path, None when unknown);
    ``raw`` the message bytes (needed to read a bounce's report; without it a bounce is
    still recognised by its headers); ``rcpt_tos`` the envelope recipients (a valid VERP
    address there names the article whose mail bounced); ``ours`` identifies our own mail.
    """
    ours = ours or Ours()
    verp_id = _verp_article(rcpt_tos, ours)

    own = _own_loop(parsed, mail_from, ours)
    if own:
        return Classification("own_loop", tuple(own), verp_article_id=verp_id)

    evidence: list[str] = []
    report_type, part_types = _report_type(parsed)
    if report_type is not None:
        evidence.append(f"multipart/report ({report_type})" if report_type not in (
            "delivery-status", "feedback-report") or "multipart" in (
            parsed.header("content-type") or "").lower() else f"message/{report_type}")
    if report_type == "feedback-report":
        return Classification("feedback_report", tuple(evidence), verp_article_id=verp_id)

    # RFC 5321 §4.5.5: notifications are sent with the null reverse-path "<>". The
    # Return-Path header (RFC 5321 §4.4) carries it for mail read back from a mailbox.
    return_path = parsed.header("return-path")
    null_sender = (mail_from is not None and mail_from.strip() in ("", "<>")) or (
        return_path is not None and return_path.strip() == "<>")
    if null_sender:
        evidence.append("empty return path (null sender)")
    daemon = next((a for a in _senders(parsed, mail_from) if is_daemon(a)), None)
    if daemon:
        evidence.append(f"sender is {_local_part(daemon)} ({_short(daemon)})")
    elif _DAEMON_NAME.search(parsed.from_name or ""):
        daemon = parsed.from_addr or "(no address)"
        evidence.append(f"sender name is {_short(parsed.from_name)}")
    subject = parsed.subject or ""
    bounce_subject = bool(_BOUNCE_SUBJECT.match(subject)) and not _REPLY_PREFIX.match(subject)
    if bounce_subject:
        evidence.append(f"subject of a delivery report ({_short(subject, 60)})")
    if verp_id is not None:
        evidence.append("sent to our VERP bounce address")

    dsn = report_type == "delivery-status" or "message/delivery-status" in part_types
    if dsn or daemon or null_sender or bounce_subject or verp_id is not None:
        report = read_bounce(raw) if raw is not None else None
        recipients = report.recipients if report is not None else ()
        if recipients:
            evidence.append(f"{report.detector}: failed "
                            + ", ".join(_short(r.address, 60) for r in recipients[:5]))
        returned = bool(part_types & {"message/rfc822", "text/rfc822-headers",
                                      "message/rfc822-headers"})
        if recipients or dsn or (bounce_subject and (daemon or null_sender or returned)):
            temporary = bool(recipients) and not report.permanent
            if not recipients and _DELAY_SUBJECT.search(subject):
                temporary = True
            kind = "delay" if temporary else "bounce"
            return Classification(kind, tuple(evidence), bounce=report, verp_article_id=verp_id)

    auto = _auto_reply_evidence(parsed, ours.loop_header)
    if report_type == "disposition-notification":
        auto.append("read receipt (RFC 8098 disposition notification)")
    if _AUTO_SUBJECT.match(subject):
        auto.append(f"subject of an automatic reply ({_short(subject, 60)})")
    ooo = bool(_OOO_SUBJECT_START.match(subject)) and not _REPLY_PREFIX.match(subject)
    # The unanchored search is the costly one: only for mail that says it is an automatic
    # answer (not for bulk and list mail, the bulk of the traffic).
    answer = any(e.startswith(_ANSWER_EVIDENCE) for e in auto) or null_sender
    if not ooo and answer and _OOO_TEXT.search(subject.lower()):
        ooo = True
    if not ooo and answer and _OOO_TEXT.search((parsed.text or "")[:400].lower()):
        ooo = True
        auto.append("the text says the person is away")
    if ooo:
        auto.append(f"out-of-office subject ({_short(subject, 60)})")
    lists = _list_evidence(parsed)
    no_reply = next((a for a in _senders(parsed, mail_from)
                     if _NO_REPLY.search(_local_part(a))), None)
    if ooo:
        return Classification("out_of_office", tuple(evidence + auto + lists),
                              verp_article_id=verp_id)
    # List software sets Precedence: bulk and X-Loop too: with list headers, those alone
    # make list mail, not an auto-reply.
    list_like = ("Precedence: bulk", "X-Loop:", f"{ours.loop_header}:")
    if auto and not (lists and all(e.startswith(list_like) for e in auto)):
        return Classification("auto_reply", tuple(evidence + auto + lists),
                              verp_article_id=verp_id)
    if lists:
        return Classification("list", tuple(evidence + lists + auto), verp_article_id=verp_id)
    if evidence:  # null sender, mailer-daemon, report of another type: machine mail
        return Classification("auto_reply", tuple(evidence), verp_article_id=verp_id)
    if no_reply:
        return Classification("auto_reply", (f"no-reply sender ({_short(no_reply)})",),
                              verp_article_id=verp_id)
    return Classification("human", verp_article_id=verp_id)
