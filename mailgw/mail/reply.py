"""Split a reply into the new text, its signature and the quoted history.

A customer's reply usually carries the whole previous conversation below it. An agent
wants to read what is new; the rest is kept, not thrown away. ``split_reply`` returns
three parts that together are the whole text: ``visible`` (what the person wrote now),
``signature`` (the sign-off block after a ``-- `` line, or "Sent from my iPhone"-style
lines, in several languages) and ``quoted`` (from the first quote header on).

Where the quoted history starts, in order of evidence on one line (or two or three, as
clients wrap them):

- an attribution line: "On <date>, <name> wrote:" and its translations (Am … schrieb,
  Le … a écrit, El … escribió, Il … ha scritto, Op … schreef, Em … escreveu, Den … skrev,
  W dniu … napisał, … написал, … kirjoitti, … 写道, …書きました);
- a separator: "-----Original Message-----" and its translations, "Begin forwarded
  message:", Outlook's line of underscores before a header block;
- an Outlook/Exchange header block: "From:" (Von:, De:, Da:, Van:, Från:, Od:, От:, 发件人…)
  followed within a few lines by "Sent:"/"Date:"/"To:"/"Subject:" in the same languages;
- a run of "> " lines that nothing new follows (an interleaved answer stays visible).

For HTML-only mail the first ``<blockquote>`` (Gmail, Apple Mail, Thunderbird, Yahoo,
mail.ru, Yandex) and an ``<hr>`` followed by a header block (Outlook, Hotmail) mark the
quote; the text is then read like plain text. Patterns are compiled at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailgw.mail.sanitize import html_to_text

__all__ = ["ReplyParts", "reply_parts", "split_html_reply", "split_reply"]

_WROTE = (r"wrote|writes|schrieb|geschrieben|a écrit|a ecrit|escribió|escribio|ha scritto|"
          r"schreef|geschreven|escreveu|skrev|skriver|napisał|napisała|napisał\(a\)|napsal|"
          r"napsala|написал|написала|написал\(а\)|kirjoitti|írta|yazdı|wrote the following|"
          r"пишет|写道|寫道|書きました|작성")
# "On …, … wrote:" (the attribution may be cut over two or three lines by the client).
_ATTRIBUTION = re.compile(
    rf"^[>\s]*(?:\*\s*)?.{{0,400}}?(?<![\w-])(?:{_WROTE})(?![\w-])"
    rf"(?:\s*\([^)]*\))?(?:[^\n:：]{{0,200}}[:：]|\s*[:：]?)\s*\**\s*$",
    re.IGNORECASE)
_DASHED_ATTRIBUTION = re.compile(rf"^[>\s]*-{{2,}}\s*.{{0,300}}(?:{_WROTE})\s*-{{2,}}\s*$",
                                 re.IGNORECASE)  # Zoho: "---- On … wrote ----"
_ATTRIBUTION_START = re.compile(
    r"^[>\s]*(?:on|am|le|el|il|op|em|den|på|pa|w dniu|dnia|dne|в|on \w+day|\d{1,4}[./-])\b",
    re.IGNORECASE)
# Japanese and Chinese clients: "2024年1月1日 10:00 山田 <a@b>:" / "…のメッセージ:".
_CJK_ATTRIBUTION = re.compile(r"^[>\s]*.{0,200}(?:年.{0,40}日.{0,200}[:：]|のメッセージ[:：]|"
                              r"在.{0,200}(?:写道|寫道)[:：]?)\s*$")
_SEPARATOR = re.compile(
    r"^[>\s]*(?:[-=_*]{2,}\s*(?:original message|original-nachricht|ursprüngliche nachricht|"
    r"message d'origine|message original|mensaje original|messaggio originale|"
    r"oorspronkelijk bericht|originalmeddelande|opprinnelig melding|oprindelig meddelelse|"
    r"wiadomość oryginalna|původní zpráva|исходное сообщение|alkuperäinen viesti|"
    r"eredeti üzenet|原始邮件|元のメッセージ|oprindelig besked|original besked|"
    r"ursprungligt meddelande|reply message|mensagem original)\s*[-=_*]{2,}\s*)\s*$",
    re.IGNORECASE)
# "<date> <name> <address>:" without a "wrote" word (Russian, Scandinavian and webmail
# clients): a digit, an address and a closing colon on one short line.
_DATED_ADDRESS = re.compile(r"^[>\s]*(?=[^\n]{0,300}\d)[^\n]{0,300}(?:<[^<>\s]+@[^<>\s]+>|"
                            r"\S+@\S+\.\w+)[^\n]{0,40}[:：]\s*$")
_UNDERSCORES = re.compile(r"^[>\s]*_{20,}\s*$")
_FROM_WORDS = (r"from|von|de|da|van|från|fra|od|от|lähettäjä|feladó|kimden|afsender|"
               r"avsender|发件人|寄件者|差出人|보낸 사람|από|expéditeur|remitente|mittente|"
               r"afzender|nadawca|odesílatel")
_HEADER_WORDS = (r"sent|date|to|subject|cc|gesendet|datum|an|betreff|envoyé|objet|à|"
                 r"enviado|fecha|para|asunto|inviato|data|a|oggetto|verzonden|aan|onderwerp|"
                 r"skickat|till|ämne|sendt|til|emne|wysłano|do|temat|odesláno|komu|předmět|"
                 r"отправлено|дата|кому|тема|lähetetty|vastaanottaja|aihe|elküldve|címzett|"
                 r"tárgy|tarih|kime|konu|发送时间|日期|收件人|主题|寄件日期|收件者|主旨|"
                 r"送信日時|宛先|件名|보낸 날짜|받는 사람|제목|envoyé le|date d'envoi")
_FROM_LINE = re.compile(rf"^[>\s]*\**\s*(?:{_FROM_WORDS})\s*\**\s*[:：]", re.IGNORECASE)
_HEADER_LINE = re.compile(rf"^[>\s]*\**\s*(?:{_HEADER_WORDS})\s*\**\s*[:：]", re.IGNORECASE)
_QUOTED = re.compile(r"^\s*>")
# Signatures: the RFC 3676 §4.3 delimiter "-- " (also without the space, and "__"), and
# the one-line signatures mobile clients add.
_SIG_DELIMITER = re.compile(r"^(?:--|_{2,})\s*$|^-[^\W\d_][\w.' -]{0,40}$")
# A sign-off that starts the signature when only a few short lines follow it.
_SIGN_OFF = re.compile(
    r"^\s*(?:(?:best|kind|warm|many|with kind)\s+regards|regards|cheers|sincerely|"
    r"mit freundlichen gr(?:ü|ue)(?:ß|ss)en|freundliche gr(?:ü|ue)(?:ß|ss)e|viele gr(?:ü|ue)(?:ß|ss)e|"
    r"cordialement|bien (?:à|a) vous|salutations|saludos(?: cordiales)?|atentamente|"
    r"cordiali saluti|distinti saluti|met vriendelijke groet(?:en)?|med vänlig hälsning|"
    r"vänliga hälsningar|med venlig hilsen|med vennlig hilsen|ystävällisin terveisin|"
    r"pozdrawiam|z poważaniem|s pozdravem|с уважением|atenciosamente|"
    r"(?:best|kind) wishes)\s*[,.!]?\s*$", re.IGNORECASE)
_SIGN_OFF_TAIL = 6  # lines after a sign-off, at most, for it to start the signature
_RULE = re.compile(r"^\s*(?:-{5,}|_{5,}|={5,})\s*$")
_MOBILE = re.compile(
    r"^\s*(?:sent from my \S.{0,60}|sent from \S+(?: \S+){0,2}|gesendet von \S.{0,40}|"
    r"envoyé (?:à partir )?de \S.{0,40}|sent with \S.{0,60}|sent via \S.{0,60}|"
    r"get outlook for \S.{0,30}|envoyé de (?:mon|ma) \S.{0,30}|"
    r"von meinem \S.{0,30} gesendet|gesendet von (?:meinem )?\S.{0,30}|"
    r"enviado desde mi \S.{0,30}|inviato da(?:l mio)? \S.{0,30}|verzonden (?:vanaf|met) "
    r"(?:mijn )?\S.{0,30}|skickat från min \S.{0,30}|sendt fra min \S.{0,30}|"
    r"wysłane z (?:mojego )?\S.{0,30}|отправлено с \S.{0,30}|enviado do meu \S.{0,30})"
    r"\s*(?:<[^<>\s]*>)?\s*$",
    re.IGNORECASE)
_HTML_QUOTE = re.compile(rf"<blockquote\b|<hr\b[^>]*>(?=(?:\s|<[^>]*>|&nbsp;)*"
                         rf"(?:{_FROM_WORDS}|{_HEADER_WORDS})\s*:)", re.IGNORECASE)
_MARK = "\u2063mailgw-quote\u2063"
_SIGNATURE_LINES = 12  # a delimiter further up than this is not a signature's
_LOOKAHEAD = 6  # lines after "From:" in which the rest of a header block must show


@dataclass(frozen=True, slots=True)
class ReplyParts:
    visible: str  # the new text, without signature
    signature: str  # the signature block, "" when none was found
    quoted: str  # the quoted history from its header on, "" when none

    @property
    def reply(self) -> str:
        """The new text with its signature (what the person typed, quotes removed)."""
        return "\n\n".join(p for p in (self.visible, self.signature) if p)


def _joined(lines: list[str], i: int, count: int) -> str:
    return " ".join(line.strip() for line in lines[i : i + count])


_WROTE_ENDINGS = tuple(w.replace("\\(", "(").replace("\\)", ")") for w in _WROTE.split("|"))


def _may_end_attribution(line: str) -> bool:
    """Cheap pre-check: an attribution ends with a colon, a dash run or the "wrote" word."""
    end = line.rstrip(" \t*")
    return end.endswith((":", "：", "-")) or end.lower().endswith(_WROTE_ENDINGS)


_DIGIT = re.compile(r"\d")


def _attribution_line(line: str) -> bool:
    """One (possibly joined) line that reads as an attribution. The cheap substring tests
    come first: most lines fail them, and the regexes run only on the few that pass."""
    low = line.lower()
    if any(word in low for word in _WROTE_ENDINGS):
        if _ATTRIBUTION.match(line) and (_ATTRIBUTION_START.match(line) or "@" in line
                                         or _DIGIT.search(line)):
            return True
        if _DASHED_ATTRIBUTION.match(line):
            return True
    if "@" in line and _DIGIT.search(line) and _DATED_ADDRESS.match(line):
        return True
    return not line.isascii() and bool(_CJK_ATTRIBUTION.match(line))


def _is_attribution(lines: list[str], i: int, depth: int = 0) -> bool:
    line = lines[i]
    if len(line) > 500 or not line.strip():
        return False
    if _may_end_attribution(line) and _attribution_line(line):
        return True
    if depth < 2 and (_ATTRIBUTION_START.match(line) or _DIGIT.search(line)):
        # Wrapped over two or three lines; unless the attribution really starts below.
        for count in (2, 3):
            if i + count > len(lines) or not _may_end_attribution(lines[i + count - 1]):
                continue
            if not all(x.strip() for x in lines[i : i + count]):
                break
            if (_ATTRIBUTION_START.match(lines[i + 1])
                    and _is_attribution(lines, i + 1, depth + 1)):
                return False
            if _attribution_line(_joined(lines, i, count)):
                return True
    return False


def _is_header_block(lines: list[str], i: int) -> bool:
    if ":" not in lines[i] and "：" not in lines[i]:
        return False
    first_is_from = bool(_FROM_LINE.match(lines[i]))
    if not first_is_from and not _HEADER_LINE.match(lines[i]):
        return False
    following = [x for x in lines[i + 1 : i + 1 + _LOOKAHEAD] if x.strip()][:4]
    headers = sum(1 for x in following if _HEADER_LINE.match(x) or _FROM_LINE.match(x))
    return headers >= (1 if first_is_from else 2)


def _is_quote_header(lines: list[str], i: int) -> bool:
    line = lines[i]
    separator = line.lstrip("> \t")[:2] in ("--", "==", "__", "**")
    return bool((separator and _SEPARATOR.match(line)) or _is_attribution(lines, i)
                or _is_header_block(lines, i)
                or (separator and _UNDERSCORES.match(line) and any(
                    _FROM_LINE.match(x) for x in lines[i + 1 : i + 4])))


def _quote_follows(lines: list[str], i: int) -> bool:
    """The header at ``i`` introduces "> " lines (within its next few lines)."""
    return any(_QUOTED.match(x) for x in lines[i + 1 : i + 5] if x.strip())


def _new_text_follows(lines: list[str], j: int) -> bool:
    while j < len(lines) and not lines[j].strip():
        j += 1
    return j < len(lines) and not (_SIG_DELIMITER.match(lines[j]) or _MOBILE.match(lines[j]))


def _quote_spans(lines: list[str]) -> list[tuple[int, int]]:
    """Line ranges [start, end) that are quoted: inline quotes, then the history."""
    n = len(lines)
    spans: list[tuple[int, int]] = []
    seen_text = False  # any non-blank line before i
    i = 0
    while i < n:
        if i and lines[i - 1].strip():
            seen_text = True
        line = lines[i]
        if _MARK in line:
            spans.append((i, n))
            break
        if not line.strip():
            i += 1
            continue
        header = _is_quote_header(lines, i)
        if header and not seen_text and not _quote_follows(lines, i):
            # A header block on the very first lines is what the person pasted or forwarded
            # (nothing new above it): read on past it.
            i += 1
            while i < n and lines[i].strip():
                i += 1
            seen_text = True
            continue
        if header or _QUOTED.match(line):
            start = i
            j = i + 1 if header else i
            k = j
            while k < n and not lines[k].strip():
                k += 1
            if header and not (k < n and _QUOTED.match(lines[k])):
                # An unquoted history (Outlook, forwards): everything from here on.
                spans.append((_back_to_rule(lines, start), n))
                break
            while k < n and (not lines[k].strip() or _QUOTED.match(lines[k])):
                k += 1
            if not _new_text_follows(lines, k):
                spans.append((_back_to_rule(lines, start), n))
                break
            spans.append((start, k))  # an interleaved answer: the quote between is history
            i, seen_text = k, True
            continue
        i += 1
    return spans


def _back_to_rule(lines: list[str], start: int) -> int:
    """Include a rule line ("-----", "_____") just above a quote header."""
    k = start - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    if k >= 0 and _RULE.match(lines[k]):
        return k
    return start


def _split_signature(lines: list[str]) -> tuple[list[str], list[str]]:
    """The signature is everything from the topmost delimiter among the last lines."""
    content = [i for i, line in enumerate(lines) if line.strip()]
    found = None
    for i in reversed(content[-_SIGNATURE_LINES:]):
        if (_SIG_DELIMITER.match(lines[i]) or _MOBILE.match(lines[i])) and i != content[0]:
            found = i
    for i in content[-_SIGN_OFF_TAIL - 1 :]:
        if _SIGN_OFF.match(lines[i]) and i != content[0] and (found is None or i < found):
            found = i
            break
    if found is None:
        return lines, []
    return lines[:found], lines[found:]


def _tidy(lines: list[str]) -> str:
    return "\n".join(lines).strip("\n").rstrip()


def split_reply(text: str) -> ReplyParts:
    """Split a plain-text body into new text, signature and quoted history. Never raises."""
    if not text or not text.strip():
        return ReplyParts("", "", "")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    spans = _quote_spans(lines)
    if spans and spans[0][0] == 0 and spans[0][1] == len(lines):
        # Everything is quoted (a forward, or a reply typed below the quote): nothing new
        # can be told apart, so the whole text stays visible.
        spans = []
    new: list[str] = []
    quoted: list[str] = []
    pos = 0
    for start, end in spans:
        new.extend(lines[pos:start])
        quoted.extend(lines[start:end])
        pos = end
    new.extend(lines[pos:])
    new, signature = _split_signature(new)
    return ReplyParts(_tidy(new).replace(_MARK, ""), _tidy(signature),
                      _tidy(quoted).replace(_MARK, ""))


def split_html_reply(html: str) -> ReplyParts:
    """The same for an HTML body: the first quote container marks the history."""
    if not html:
        return ReplyParts("", "", "")
    found = _HTML_QUOTE.search(html)
    if found:
        html = f"{html[: found.start()]}<p>{_MARK}</p>{html[found.start():]}"
    return split_reply(html_to_text(html))


def reply_parts(text: str, html: str | None) -> ReplyParts:
    """The parts of a message's new text: from the plain text, or from the HTML when the quote
    shows only in the markup (``<blockquote>``, an ``<hr>`` before the history)."""
    parts = split_reply(text)
    if not parts.quoted and html and ("<blockquote" in html or "<hr" in html):
        from_html = split_html_reply(html)
        if from_html.quoted:
            return from_html
    return parts
