"""Rule-based sentence segmentation for next-sentence prediction (no model, no extra dependency).

Boundaries are terminal punctuation (. ! ? and ellipses), optionally followed by closing quotes or brackets, then
whitespace; CJK 。！？ and the Devanagari danda end a sentence with or without whitespace after them. A boundary
is rejected after a known abbreviation ("Dr.", "e.g."), after a single-letter initial ("J. R. R. Tolkien"), and
before a lowercase continuation ("approx. five", "wait... and"). Decimals never match because a Latin boundary
needs whitespace after the punctuation. Blank lines are paragraph boundaries; a single line
break is a boundary only after terminal punctuation, so hard-wrapped text (Project Gutenberg) is re-joined while
one-paragraph-per-line text (Wikipedia) keeps its paragraphs apart.
"""

from __future__ import annotations

import re

ABBREVIATIONS: frozenset[str] = frozenset(
    """
    mr mrs ms mx dr prof sr jr st mt ft rev hon gov sen rep pres gen col lt maj capt cmdr sgt adm supt insp
    messrs mme mlle esq vs v etc cf al fig figs eq eqs no nos vol vols pp p ed eds trans inc ltd co corp bros dept
    univ assn est approx ca c cir jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun
    e.g i.e a.m p.m u.s u.k u.n ph.d b.a m.a b.c a.d b.c.e c.e viz ibid op art sec ch chap ave blvd rd
    """.split()
)

# Closing quotes and brackets that may follow terminal punctuation, Latin and CJK.
_CLOSERS = "\"'\u201d\u2019)]\u300d\u300f\u3011\u3015\uff09\uff3d"
# CJK full stops and marks (。！？) and the Devanagari danda (। ॥) end a sentence without a following space:
# Chinese and Japanese put none, and Hindi text often runs on after a danda.
_NO_SPACE_TERMINALS = "\u3002\uff01\uff1f\u0964\u0965"
_OPENERS = "\u300c\u300e\u3010\u3014\uff08\u201c\"("
_CLOSE = f"[{re.escape(_CLOSERS)}]*"
# The leading lookahead names every character a boundary can start with: without it the engine tries both
# alternatives at every position of the text; with it, it skips ahead to the next candidate (2-3x faster scans).
_BOUNDARY = re.compile(rf"(?=[.!?\u2026{_NO_SPACE_TERMINALS}])"
                       rf"(?:[.!?\u2026]+{_CLOSE}\s+|[{_NO_SPACE_TERMINALS}]+{_CLOSE}\s*)")
_ACRONYM = re.compile(r"(?:[a-z]\.)+[a-z]")
_LINE_END_TERMINALS = frozenset(f".!?\u2026:{_NO_SPACE_TERMINALS}")


def split_block(block: str) -> list[str]:
    """Sentences of one block of text without line breaks."""
    sentences: list[str] = []
    _split_block_into(block, sentences)
    return sentences


def _split_block_into(block: str, out: list[str]) -> None:
    """Append the sentences of `block` to `out`.

    A punctuation+space match ends a sentence unless: it ends the block, or a lowercase letter follows; after CJK
    or danda punctuation, it closes a quoted sentence that runs straight on into its own sentence (「はい。」と
    答えた); after a period that is not an ellipsis, the word before it is a known abbreviation, a single-letter
    initial ("J. Smith") or a dotted acronym ("U.S.A. Today"). The tests are inline in one loop because it runs
    for every candidate of every document, where a function call per candidate is a measurable share.
    """
    start, n = 0, len(block)
    for match in _BOUNDARY.finditer(block):
        end = match.end()
        if end >= n or block[end].islower():
            continue
        punct_at = match.start()
        punct = block[punct_at]
        if punct in _NO_SPACE_TERMINALS:
            if block[end - 1] in _CLOSERS and block[end] not in _OPENERS:
                continue
        elif punct == "." and not (punct_at + 1 < n and block[punct_at + 1] == "."):
            word = block[block.rfind(" ", 0, punct_at) + 1:punct_at].lstrip("\"'(\u201c\u2018[").lower()
            if word and (word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())
                         or ("." in word and _ACRONYM.fullmatch(word))):
                continue
        sentence = block[start:end].strip()
        if sentence:
            out.append(sentence)
        start = end
    tail = block[start:].strip()
    if tail:
        out.append(tail)


def _blocks(paragraph: str) -> list[str]:
    """Re-join hard-wrapped lines; a line ending in terminal punctuation (or a colon), optionally followed by
    closing quotes or brackets, closes its block."""
    if "\n" not in paragraph:
        paragraph = paragraph.strip()
        return [paragraph] if paragraph else []
    blocks, current = [], []
    for line in paragraph.split("\n"):
        line = line.strip()
        if not line:
            continue
        current.append(line)
        if line.rstrip(_CLOSERS)[-1:] in _LINE_END_TERMINALS:
            blocks.append(" ".join(current) if len(current) > 1 else line)
            current = []
    if current:
        blocks.append(" ".join(current))
    return blocks


def _merge_short(sentences: list[str], min_chars: int) -> list[str]:
    """Merge sentences shorter than `min_chars` into the previous one (or the next one when first)."""
    if min_chars <= 1:
        return sentences
    merged: list[str] = []
    for sentence in sentences:
        if merged and (len(sentence) < min_chars or len(merged[-1]) < min_chars):
            merged[-1] = f"{merged[-1]} {sentence}"
        else:
            merged.append(sentence)
    return merged


def sentence_tree(text: str) -> list[list[list[str]]]:
    """The sentences of a cleaned document grouped by paragraph (blank-line separated) and block (a line, or
    hard-wrapped lines re-joined): what `split_sentences` flattens, kept so a document can be rebuilt without
    some of its sentences."""
    return [[split_block(block) for block in _blocks(paragraph)] for paragraph in text.split("\n\n")]


def split_sentences(text: str, min_chars: int = 1) -> list[str]:
    """Split a cleaned document into sentences; paragraphs and sentences keep their order."""
    sentences: list[str] = []
    for paragraph in text.split("\n\n"):
        for block in _blocks(paragraph):
            _split_block_into(block, sentences)
    return _merge_short(sentences, min_chars)
