"""Charset labels from the wire to Python codecs, and decoding that never raises.

Mail declares its charset in a label that is often wrong: Python does not know it
(``ks_c_5601-1987``, ``x-unknown``), knows only a subset of what senders really use
(``gb2312`` for GBK text, ``iso-2022-jp`` with NEC/IBM extensions, ``iso-8859-1`` for
windows-1252 quotes), or the label is mangled (``charset="charset=us-ascii"``, an RFC 2231
language suffix, quotes). The substitutions below are the WHATWG Encoding Standard's
label table where it has one, and the usual mail-client practice otherwise.

``decode`` tries the declared charset, then its wider variants, then UTF-8, then
windows-1252, and finally decodes lossily; it never raises, and it reports what it did in
``defects`` so the article says why a character may look wrong.
"""

from __future__ import annotations

import codecs
from functools import lru_cache

__all__ = ["LATIN1_SUPERSET", "codec_for", "decode"]

# Labels Python does not know, or knows only as a subset of what senders really use; the
# targets are the supersets the WHATWG Encoding Standard maps these labels to.
ALIASES = {
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "ks_c_5601-1989": "cp949",
    "ksc5601": "cp949",
    "ksc_5601": "cp949",
    "korean": "cp949",
    "euc-kr": "cp949",
    "gb2312": "gb18030",
    "gb_2312-80": "gb18030",
    "gb_2312": "gb18030",
    "chinese": "gb18030",
    "csgb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "euc-cn": "gb18030",
    "cn-gb": "gb18030",
    "big5": "cp950",
    "x-x-big5": "cp950",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "windows-31j": "cp932",
    "euc-jp": "euc_jis_2004",
    "x-euc-jp": "euc_jis_2004",
    # ISO-2022-JP as Microsoft and Japanese carriers send it (NEC/IBM extensions,
    # half-width katakana): the "ext" codec decodes plain ISO-2022-JP too.
    "iso-2022-jp": "iso2022_jp_ext",
    "iso-2022-jp-ms": "iso2022_jp_ext",
    "cp50220": "iso2022_jp_ext",
    "cp50221": "iso2022_jp_ext",
    "cp50222": "iso2022_jp_ext",
    "csiso2022jp": "iso2022_jp_ext",
    "iso-2022-jp-1": "iso2022_jp_1",
    "iso-2022-jp-2": "iso2022_jp_2",
    "iso-2022-jp-3": "iso2022_jp_3",
    "iso-2022-jp-2004": "iso2022_jp_2004",
    "tis-620": "cp874",
    "windows-874": "cp874",
    "iso-8859-11": "cp874",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-9": "cp1254",
    "latin5": "cp1254",
    "unicode-1-1-utf-7": "utf-7",
    "x-unicode20utf8": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
    "utf8": "utf-8",
    "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    "x-mac-cyrillic": "mac_cyrillic",
    "x-mac-ukrainian": "mac_cyrillic",
    "x-mac-greek": "mac_greek",
    "x-mac-turkish": "mac_turkish",
    "x-mac-icelandic": "mac_iceland",
    "x-mac-ce": "mac_latin2",
    "iso-10646-ucs-2": "utf-16-be",
    "ucs-2": "utf-16-be",
    "unicode": "utf-16",
    "x-cp1250": "cp1250",
    "x-cp1251": "cp1251",
    "koi8-ru": "koi8_u",
}
# Labels that say "I do not know": decoded as if nothing was declared.
UNKNOWN = frozenset({"x-unknown", "unknown", "unknown-8bit", "x-user-defined", "default",
                     "8bit", "binary", "none", "charset", "_autodetect_all", "auto"})
# Single-byte Latin labels: WHATWG decodes them as windows-1252, which is what the senders
# almost always meant (0x80-0x9F are curly quotes and dashes, not C1 controls).
LATIN1_SUPERSET = "cp1252"
# Codecs too weak to be worth a lossy decode: for these, other guesses come first.
_WEAK_CODECS = frozenset({"ascii"})
_LABEL_JUNK = "\"'` ;\t"


@lru_cache(maxsize=512)
def codec_for(label: str | None) -> str | None:
    """The Python codec for a charset label from the wire, or None when unusable."""
    if not label:
        return None
    name = label.strip(_LABEL_JUNK).lower()
    while name.startswith("charset="):  # seen in the wild: charset="charset=us-ascii"
        name = name[len("charset=") :].strip(_LABEL_JUNK)
    name = name.split("*", 1)[0].strip()  # RFC 2231 §5 language suffix: "utf-8*en"
    if not name or name in UNKNOWN:
        return None
    name = ALIASES.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    # "base64", "zlib", "rot13"... are codecs too, but not text encodings.
    if not getattr(info, "_is_text_encoding", True):
        return None
    return LATIN1_SUPERSET if info.name == "iso8859-1" else info.name


# A codec that failed on the bytes: the wider ones that the same label is used for.
_WIDER = {
    "iso2022_jp_ext": ("iso2022_jp_2004", "iso2022_jp_2"),
    "iso2022_jp": ("iso2022_jp_ext", "iso2022_jp_2004", "iso2022_jp_2"),
    "euc_jp": ("euc_jis_2004",),
    "euc_jis_2004": ("cp932",),  # mislabelled Shift_JIS
    "gb2312": ("gb18030",),
    "cp949": ("euc_kr",),
}


def decode(data: bytes, label: str | None, defects: list[str] | None = None) -> str:
    """Decode text in the declared charset, falling back without ever raising.

    Order: the declared charset and its wider variants; UTF-8 (the most common
    mislabelling, and text that is not UTF-8 rarely validates as UTF-8); windows-1252 when
    nothing usable was declared; then a lossy decode in the declared charset or, failing
    that, UTF-8 with replacement.
    """
    codec = codec_for(label)
    if codec is not None:
        for candidate in (codec, *_WIDER.get(codec, ())):
            try:
                return data.decode(candidate)
            except (UnicodeError, LookupError):
                continue
    try:
        text = data.decode("utf-8")
    except UnicodeError:
        pass
    else:
        if label and codec is None and defects is not None:
            defects.append(f"unknown charset {label[:40]!r}, decoded as utf-8")
        return text
    if codec is None or codec in _WEAK_CODECS:
        try:
            text = data.decode(LATIN1_SUPERSET)
        except UnicodeError:
            codec = "utf-8"
        else:
            if label and defects is not None:
                defects.append(f"bytes invalid in charset {label[:40]!r}, decoded as windows-1252")
            return text
    if defects is not None:
        defects.append(f"bytes invalid in charset {(label or '')[:40]!r}, decoded with replacement")
    try:
        return data.decode(codec, "replace")
    except (UnicodeError, LookupError):  # a stateful codec can still fail on garbage
        return data.decode("utf-8", "replace")
