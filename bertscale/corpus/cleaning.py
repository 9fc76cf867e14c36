"""Text cleaning: UTF-8 decoding with counted repairs, Unicode normalization, control characters, markup remnants
and whitespace. Plain functions on strings, shared by the Beam stage and the single-process reference loop."""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

NormalForm = Literal["NFC", "NFKC", "NFD", "NFKD", "none"]


class DecodeError(ValueError):
    """A record whose bytes are not usable UTF-8 text (too many invalid bytes, or NUL bytes)."""


@dataclass(frozen=True)
class Decoded:
    text: str
    invalid_bytes: int  # invalid UTF-8 bytes that were dropped (0 for clean input)


def decode_utf8(data: bytes, max_invalid_ratio: float) -> Decoded:
    """Decode UTF-8; drop and count invalid bytes up to `max_invalid_ratio` of the record, else raise DecodeError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        first = err.start
        # errors="replace" yields one U+FFFD per invalid sequence; genuine U+FFFD in the input are counted too,
        # which errs on the side of rejecting a record.
        text = data.decode("utf-8", errors="replace")
        invalid = text.count("\ufffd")
        if invalid > max_invalid_ratio * max(len(data), 1):
            raise DecodeError(
                f"invalid UTF-8: {invalid} bad byte sequence(s) in {len(data)} bytes, first at byte {first} of the "
                f"record; re-encode the file as UTF-8 (or raise corpus.max_invalid_utf8_ratio)"
            ) from None
        text = text.replace("\ufffd", "")
        return Decoded(_check_nul(text), invalid)
    return Decoded(_check_nul(text), 0)


def _check_nul(text: str) -> str:
    if "\x00" in text:
        raise DecodeError("binary data: the record contains NUL bytes; it is not text")
    return text


def normalize_unicode(text: str, form: NormalForm) -> str:
    """Unicode normal form (NFC keeps accents composed, NFKC also folds compatibility characters like ligatures)."""
    if form == "none" or text.isascii():
        return text
    return unicodedata.normalize(form, text)


# Line and paragraph separators become newlines; every other C0/C1 control, zero-width and bidi formatting
# character, lone surrogates (from JSON escapes), the BOM and stray replacement characters are removed.
# Tab and newline survive for the whitespace pass.
_NEWLINES = re.compile(r"[\r\u2028\u2029\x0b\x0c\x85]")
_CONTROL = re.compile(
    r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ud800-\udfff\ufeff\ufffd]"
)


# Either class in one pattern: one scan settles the common case of a text that has none of them.
_NEWLINE_OR_CONTROL = re.compile(_NEWLINES.pattern[:-1] + _CONTROL.pattern[1:])


def remove_control_chars(text: str) -> str:
    """Unify line breaks to \\n and drop control and invisible formatting characters."""
    if _NEWLINE_OR_CONTROL.search(text) is None:
        return text
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")
    return _CONTROL.sub("", _NEWLINES.sub("\n", text))


# Blocks whose content is not running text (comments, citations, scripts): removed with their content. A
# self-closing `<ref name="a" />` opens no block, so the text after it survives.
_BLOCK_TAGS = ("script", "style", "ref", "math", "gallery", "timeline")
_BLOCK_OPEN = re.compile(rf"<!--|<({'|'.join(_BLOCK_TAGS)})\b[^<>]*(?<!/)>", re.I)
_BLOCK_CLOSE = {"!--": re.compile("-->"),
                **{tag: re.compile(rf"</{tag}\s*>", re.I) for tag in _BLOCK_TAGS}}
# Only known HTML/wiki tag names, so that comparisons in running text ("if x<y and y>z") are kept.
_TAG_NAMES = (
    "a abbr b bdi bdo big blockquote body br caption center cite code col colgroup dd del dfn div dl dt em "
    "font h1 h2 h3 h4 h5 h6 head hr html i img includeonly ins kbd li link mark math meta noinclude nowiki ol "
    "onlyinclude p poem pre q rb rp rt ruby s samp section small source span strike strong sub sup "
    "syntaxhighlight table tbody td templatestyles tfoot th thead time tr tt u ul var wbr references ref "
    "gallery timeline score chem ce script style"
).split()
_HTML_TAG = re.compile(rf"</?(?:{'|'.join(_TAG_NAMES)})\b(?:\s[^<>]*)?/?>", re.I)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
# Possessive URL and no brackets or newlines in the label: an unclosed "[http://..." costs one bounded scan.
_WIKI_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\[\]]++\s*([^\[\]\n]*)\]")
_WIKI_EMPHASIS = re.compile(r"'{2,5}")
_WIKI_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.M)
_WIKI_TABLE_LINE = re.compile(r"^\s*(?:\{\||\|\}|\|-).*$", re.M)
# WikiExtractor leaves empty or punctuation-only brackets where templates were: "Shanghai () is", "(; born ...)".
# Both patterns start with a bracket so the regex engine skips ahead quickly on long texts; the space left
# behind ("Shanghai  is") is collapsed by the whitespace pass.
_EMPTY_BRACKETS = re.compile(r"[(\[][\s,;:]*[)\]]")
_LEADING_BRACKET_PUNCT = re.compile(r"\([\s,;:]*[,;:][\s,;:]*")


def remove_blocks(text: str) -> str:
    """Drop comments and <ref>/<script>/... blocks with their content, in time linear in the text length.

    A lazy `<ref>.*?</ref>` regex rescans the rest of the text from every unclosed opening tag (quadratic). Here
    each opening searches forward once for its closing tag; when there is none, no later opening of that kind
    can be closed either, so that kind is not searched again and its openings are left to the tag pass.
    """
    pieces: list[str] = []
    kept_from = pos = 0
    unclosed: set[str] = set()
    while (match := _BLOCK_OPEN.search(text, pos)) is not None:
        kind = (match.group(1) or "!--").lower()
        close = None if kind in unclosed else _BLOCK_CLOSE[kind].search(text, match.end())
        if close is None:
            unclosed.add(kind)
            pos = match.end()
            continue
        pieces.append(text[kept_from:match.start()])
        kept_from = pos = close.end()
    pieces.append(text[kept_from:])
    return "".join(pieces)


def strip_markup(text: str) -> str:
    """Remove HTML tags and comments, entities, and wiki markup remnants, keeping the visible text."""
    if "<" in text:
        text = remove_blocks(text)
        text = _HTML_TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    if "{{" in text:
        # Nested templates: strip innermost first until none remain (bounded by nesting depth).
        for _ in range(8):
            text, n = _WIKI_TEMPLATE.subn("", text)
            if not n:
                break
    if "[" in text:
        text = _WIKI_LINK.sub(r"\1", text)
        text = _WIKI_EXT_LINK.sub(r"\1", text)
    if "''" in text:
        text = _WIKI_EMPHASIS.sub("", text)
    if "\n=" in text or text.startswith("="):
        text = _WIKI_HEADING.sub(r"\2", text)
    if "{|" in text or "\n|-" in text:
        text = _WIKI_TABLE_LINE.sub("", text)
    if "(" in text or "[" in text:
        text = _EMPTY_BRACKETS.sub("", text)
        text = _LEADING_BRACKET_PUNCT.sub("(", text)
    return text


# Blanks other than the plain space (tab, NBSP, en/em spaces...); newlines are handled separately. Each pass is
# guarded by a cheap substring test because most documents need none of them.
_OTHER_BLANKS = re.compile(r"[\t\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_MULTI_SPACE = re.compile(r"  +")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces/tabs to one space, trim lines, keep at most one blank line (a paragraph break)."""
    if "\t" in text or not text.isascii():  # str.isascii is O(1): ASCII text can only hold the tab
        text = _OTHER_BLANKS.sub(" ", text)
    if "  " in text:
        text = _MULTI_SPACE.sub(" ", text)
    if " \n" in text:
        text = text.replace(" \n", "\n")
    if "\n " in text:
        text = text.replace("\n ", "\n")
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def clean_text(text: str, normalization: NormalForm = "NFC", markup: bool = True) -> str:
    """The full cleaning chain, in the order that lets each step see the previous step's output."""
    text = normalize_unicode(text, normalization)
    text = remove_control_chars(text)
    if markup:
        text = strip_markup(text)
    return normalize_whitespace(text)
