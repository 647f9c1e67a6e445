"""Specs for mailgw.mail.charsets: mislabelled and unknown charsets decode, never raise."""

from __future__ import annotations

import pytest

from mailgw.mail.charsets import codec_for, decode
from mailgw.mail.parse import parse_message


@pytest.mark.parametrize(("label", "codec"), [
    ("ks_c_5601-1987", "cp949"), ("KS_C_5601-1987", "cp949"), ("gb2312", "gb18030"),
    ("GBK", "gb18030"), ("iso-2022-jp", "iso2022_jp_ext"), ("ISO-2022-JP-MS", "iso2022_jp_ext"),
    ("cp50220", "iso2022_jp_ext"), ("iso-2022-jp-2", "iso2022_jp_2"), ("shift_jis", "cp932"),
    ("iso-8859-1", "cp1252"), ("latin1", "cp1252"), ('"utf-8"', "utf-8"),
    ("charset=us-ascii", "ascii"), ('charset="charset=utf-8"', "utf-8"), ("utf-8*en", "utf-8"),
    ("x-mac-roman", "mac-roman"), ("iso-8859-8-i", "iso8859-8"),
])
def test_labels_map_to_the_codec_senders_mean(label, codec):
    assert codec_for(label) == codec


@pytest.mark.parametrize("label", ["x-unknown", "unknown-8bit", "", None, "base64", "zlib",
                                   "no-such-charset", "utf-8\x00", "=?x?="])
def test_unusable_labels_give_no_codec(label):
    assert codec_for(label) is None


def test_gbk_text_labelled_gb2312_decodes():
    text = "镕基"  # 镕 is in GBK but not in GB 2312
    assert decode(text.encode("gbk"), "gb2312") == text


def test_korean_labelled_ks_c_5601_decodes():
    text = "안녕하세요 똠방각하"  # 똠 needs the cp949 extension
    assert decode(text.encode("cp949"), "ks_c_5601-1987") == text


def test_iso_2022_jp_with_nec_extensions_decodes():
    text = "①番 ㈱テスト"  # NEC row 13 characters, as Outlook sends them
    data = text.encode("iso2022_jp_2004")
    assert decode(data, "iso-2022-jp") == text


def test_unknown_and_wrong_labels_fall_back_without_raising():
    defects: list[str] = []
    assert decode("Grüße".encode(), "x-unknown", defects) == "Grüße"
    # declared UTF-8 that is not: the bad byte is replaced, the rest kept (and reported)
    assert decode("naïve".encode("cp1252"), "utf-8", defects) == "na\ufffdve"
    assert decode(b"\x93quoted\x94", "us-ascii", defects) == "\u201cquoted\u201d"
    assert decode(b"\xff\xfe\xfa", "iso-2022-jp", defects)  # garbage: lossy, but text
    assert defects


def test_messages_with_bad_charsets_parse():
    for label in ("ks_c_5601-1987", "x-unknown", 'charset="charset=utf-8"', "bogus", "iso-2022-jp"):
        raw = (f"From: a@b.test\r\nSubject: =?{label}?B?w6k=?=\r\n"
               f"Content-Type: text/plain; charset={label}\r\n\r\n").encode() + "é ok".encode()
        mail = parse_message(raw)
        assert "ok" in mail.text
