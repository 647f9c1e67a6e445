"""Specs for mailgw.mail.reply: new text, signature and quoted history, apart."""

from __future__ import annotations

import pytest

from mailgw.mail.reply import split_html_reply, split_reply
from mailgw.mail.sanitize import sanitize_html


@pytest.mark.parametrize("header", [
    "On Mon, Jan 6, 2025 at 10:00 AM Bob Smith <bob@example.com> wrote:",  # Gmail
    "On 06.01.2025 10:00, Bob Smith wrote:",  # Thunderbird
    "Am 06.01.2025 um 10:00 schrieb Bob Smith <bob@example.com>:",  # de
    "Le lun. 6 janv. 2025 à 10:00, Bob Smith <bob@example.com> a écrit :",  # fr
    "El lun, 6 ene 2025 a las 10:00, Bob Smith (<bob@example.com>) escribió:",  # es
    "Il giorno lun 6 gen 2025 alle ore 10:00 Bob Smith <bob@example.com> ha scritto:",  # it
    "Op ma 6 jan. 2025 om 10:00 schreef Bob Smith <bob@example.com>:",  # nl
    "Em seg., 6 de jan. de 2025 às 10:00, Bob Smith <bob@example.com> escreveu:",  # pt
    "Den mån 6 jan. 2025 kl 10:00 skrev Bob Smith <bob@example.com>:",  # sv
    "W dniu 6.01.2025 o 10:00, Bob Smith pisze <bob@example.com> napisał:",  # pl
    "пн, 6 янв. 2025 г. в 10:00, Bob Smith <bob@example.com>:",  # ru (Gmail)
    "2025年1月6日(月) 10:00 Bob Smith <bob@example.com>:",  # ja (Gmail)
    "-----Original Message-----",  # Outlook
    "-----Ursprüngliche Nachricht-----",
])
def test_quote_headers_in_several_languages(header):
    text = f"Thanks, that fixed it.\n\n{header}\n> Did you restart it?\n> Bob\n"
    parts = split_reply(text)
    assert parts.visible == "Thanks, that fixed it."
    assert parts.quoted.startswith(header.strip())
    assert "Did you restart it?" in parts.quoted


def test_attribution_wrapped_over_two_lines():
    text = ("Works now.\n\nOn Mon, Jan 6, 2025 at 10:00 AM Bob Smith <\nbob@example.com> wrote:\n\n"
            "> Try again\n")
    parts = split_reply(text)
    assert parts.visible == "Works now." and parts.quoted.startswith("On Mon")


@pytest.mark.parametrize(("from_", "sent"), [
    ("From:", "Sent:"), ("Von:", "Gesendet:"), ("De :", "Envoyé :"), ("De:", "Enviado el:"),
    ("*From:*", "*Sent:*"),
])
def test_outlook_header_block_without_quote_marks(from_, sent):
    text = (f"Yes, please go ahead.\n\nBob\n\n________________________________\n"
            f"{from_} Support <support@example.com>\n{sent} Monday, January 6, 2025 10:00\n"
            "To: Bob\nSubject: Your request\n\nShall we replace the printer?\n")
    parts = split_reply(text)
    assert parts.visible == "Yes, please go ahead.\n\nBob"
    assert "Shall we replace the printer?" in parts.quoted
    assert "Shall we" not in parts.visible


def test_signatures_are_split_off():
    parts = split_reply("See attached.\n\n-- \nBob Smith\nACME Corp\n")
    assert (parts.visible, parts.signature) == ("See attached.", "-- \nBob Smith\nACME Corp")
    parts = split_reply("OK, thanks!\n\nSent from my iPhone\n\nOn Mon, Bob <b@x.test> wrote:\n> hi")
    assert (parts.visible, parts.signature) == ("OK, thanks!", "Sent from my iPhone")
    parts = split_reply("Danke!\n\nVon meinem iPhone gesendet")
    assert parts.visible == "Danke!" and parts.signature == "Von meinem iPhone gesendet"
    parts = split_reply("Please call me.\n\nBest regards,\nBob\n")
    assert parts.visible == "Please call me." and parts.reply == "Please call me.\n\nBest regards,\nBob"


def test_interleaved_answers_stay_visible_and_quotes_go_to_history():
    text = ("On Mon, Bob <bob@example.com> wrote:\n> Which model?\n\nThe X200.\n\n"
            "> Which floor?\n\nThe fourth.\n")
    parts = split_reply(text)
    assert parts.visible == "The X200.\n\nThe fourth."
    assert "Which model?" in parts.quoted and "Which floor?" in parts.quoted


def test_text_without_quote_is_all_visible_and_forwards_are_kept():
    body = "Please see the forwarded mail.\n\n---------- Forwarded message ---------\nFrom: x"
    assert split_reply(body).visible == body
    assert split_reply("just one line").visible == "just one line"
    assert split_reply("") == split_reply("   \n")


def test_words_like_from_or_wrote_in_a_sentence_are_not_headers():
    text = ("From: the logs I see errors.\nMy colleague wrote: it worked yesterday.\n"
            "Here is what I did.\n")
    assert split_reply(text).visible == text.strip()


def test_html_blockquote_and_outlook_rule():
    gmail = ('<div dir="ltr">Thanks, works!</div><br><div class="gmail_quote">'
             '<div class="gmail_attr">On Mon, Jan 6, 2025 Bob &lt;bob@example.com&gt; wrote:<br>'
             '</div><blockquote class="gmail_quote">Did it work?</blockquote></div>')
    parts = split_html_reply(sanitize_html(gmail))
    assert parts.visible == "Thanks, works!" and "Did it work?" in parts.quoted
    outlook = ("<p>Approved.</p><hr><p><b>From:</b> Bob<br><b>Sent:</b> Monday<br>"
               "<b>Subject:</b> PO</p><p>Please approve.</p>")
    parts = split_html_reply(sanitize_html(outlook))
    assert parts.visible == "Approved." and "Please approve." in parts.quoted


def test_never_raises_on_odd_input():
    for text in ("\x00\r\n>\r\n>", "> " * 10000, "On\n" * 1000, "-- \n" * 50, "\u2063" * 10):
        split_reply(text)
    split_html_reply("<blockquote>" * 500)
