"""Cleaning rules, one by one, and UTF-8 decoding with counted repairs."""

from __future__ import annotations

import pytest

from bertscale.corpus.cleaning import (
    DecodeError,
    clean_text,
    decode_utf8,
    normalize_unicode,
    normalize_whitespace,
    remove_control_chars,
    strip_markup,
)


def test_decode_utf8_repairs_a_few_invalid_bytes_and_counts_them():
    decoded = decode_utf8(b"caf\xe9 au lait " * 20, max_invalid_ratio=0.1)
    assert decoded.invalid_bytes == 20 and "\ufffd" not in decoded.text and decoded.text.startswith("caf au")
    assert decode_utf8("déjà vu".encode(), 0.0).invalid_bytes == 0


def test_decode_utf8_rejects_mostly_invalid_and_nul_bytes():
    with pytest.raises(DecodeError, match="invalid UTF-8"):
        decode_utf8(b"\xff\xfe" * 50 + b"text", max_invalid_ratio=0.01)
    with pytest.raises(DecodeError, match="NUL"):
        decode_utf8(b"abc\x00def", max_invalid_ratio=0.01)


def test_normalize_unicode_forms():
    decomposed = "e\u0301"
    assert normalize_unicode(decomposed, "NFC") == "\u00e9"
    assert normalize_unicode("\ufb01le", "NFKC") == "file"
    assert normalize_unicode(decomposed, "none") == decomposed


def test_remove_control_chars_keeps_newlines_and_tabs():
    text = "a\x00b\u200bc\r\nd\u2028e\tf\ufeff\x7f\ud800"
    assert remove_control_chars(text) == "abc\nd\ne\tf"


def test_strip_markup_removes_html_and_wiki_remnants():
    text = ("<p>Hello <b>world</b></p><!-- note --> &amp; [[Paris|the capital]] {{cite web|x}}'''bold''' "
            "Harrow School () is (; born 1990) here<ref name=a>ref text</ref>.\n== History ==")
    out = normalize_whitespace(strip_markup(text))
    assert out == "Hello world & the capital bold Harrow School is (born 1990) here.\nHistory"


def test_normalize_whitespace_collapses_runs_and_blank_lines():
    assert normalize_whitespace("  a \t b\u00a0c \n\n\n\n d  \n") == "a b c\n\nd"


def test_clean_text_chains_all_steps():
    assert clean_text("  <i>Cafe\u0301</i>\x00  bar\r\n\r\n\r\nnext ") == "Caf\u00e9 bar\n\nnext"
    assert clean_text("<i>x</i>", markup=False) == "<i>x</i>"


def test_self_closing_ref_keeps_the_text_after_it():
    text = 'big.<ref name="a" /> It has many museums. <ref>Cite</ref> End.'
    assert clean_text(text) == "big. It has many museums. End."


def test_comparisons_in_running_text_are_not_tags():
    assert clean_text("If x<y and y>z then a < b > c.") == "If x<y and y>z then a < b > c."
    assert clean_text("keep <b>bold</b> and <span class='x'>span</span>") == "keep bold and span"


def test_unclosed_blocks_are_searched_for_their_closing_tag_once(monkeypatch):
    # The old lazy `<ref>.*?</ref>` rescanned the rest of the text from every unclosed opening (quadratic).
    from bertscale.corpus import cleaning

    calls: list[str] = []

    class Counting:
        def __init__(self, pattern):
            self.pattern = pattern

        def search(self, text, pos=0):
            calls.append(self.pattern.pattern)
            return self.pattern.search(text, pos)

    monkeypatch.setattr(cleaning, "_BLOCK_CLOSE", {k: Counting(v) for k, v in cleaning._BLOCK_CLOSE.items()})
    text = "<ref>first</ref>kept " + "word <ref>cite " * 500 + "<!-- open " * 500 + "tail"
    out = cleaning.strip_markup(text)
    assert len(calls) == 3  # the closed block, then one failed search per unclosed kind
    assert out.startswith("kept word cite word") and "<ref>" not in out and out.endswith("tail")
