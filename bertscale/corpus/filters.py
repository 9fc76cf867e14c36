"""Document quality filters in the spirit of Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020).

Each rule is a small object with a `name` and a `keep(doc)` method over a `DocView`, which computes words, lines and
paragraphs once per document. A document is dropped by the first rule it fails, and the stage counts drops per
rule name, so every rule's effect is visible in the manifest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import filterfalse, repeat
from typing import Protocol

from bertscale.config import FilterConfig

# A word "is alphabetic" (Gopher) when it contains at least one letter of any script.
_HAS_LETTER = re.compile(r"[^\W\d_]")
_TERMINAL_PUNCT = (".", "!", "?", '"', "'", "\u201d", "\u2019", "\u2026", ")", ":", ";",
                   "\u3002", "\uff01", "\uff1f", "\u300d", "\u0964", "\u0965")
# Scripts written without spaces between words: Hiragana, Katakana, CJK ideographs (with extensions and
# compatibility forms), half-width Katakana, Thai. Each of their characters counts as one word (Thai vowel and tone
# marks stay with their consonant), so a Chinese or Thai document is not a handful of huge "words".
_UNSPACED_RANGES = ("\u0e01-\u0e30\u0e32\u0e33\u0e3f-\u0e46\u0e4f-\u0e5b\u3040-\u30ff\u3400-\u4dbf"
                    "\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")
_THAI_MARKS = "\u0e31\u0e34-\u0e3a\u0e47-\u0e4e"
_UNSPACED = re.compile(f"[{_UNSPACED_RANGES}]")
_WORD = re.compile(f"[{_UNSPACED_RANGES}][{_THAI_MARKS}]*|[^\\s{_UNSPACED_RANGES}{_THAI_MARKS}]+")


class DocView:
    """Lazily computed statistics of one cleaned document, shared by all rules.

    Plain attributes filled on first use rather than `functools.cached_property`, whose per-access cost (a lock
    in Python 3.11) showed in profiles: this runs for every document of the corpus.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._unspaced: bool | None = None
        self._words: list[str] | None = None
        self._lines: list[str] | None = None
        self._mean: tuple[float | None] | None = None

    @property
    def unspaced(self) -> bool:
        """Whether the text has characters of scripts written without spaces (checked once, in C)."""
        if self._unspaced is None:
            self._unspaced = not self.text.isascii() and _UNSPACED.search(self.text) is not None
        return self._unspaced

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = _WORD.findall(self.text) if self.unspaced else self.text.split()
        return self._words

    @property
    def split_words(self) -> list[str] | None:
        """`text.split()` if the rules already computed it (a spaced text whose words were needed), else None."""
        return self._words if self._words is not None and self._unspaced is False else None

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = list(filter(None, self.text.split("\n")))
        return self._lines

    @property
    def paragraphs(self) -> list[str]:
        return list(filter(None, self.text.split("\n\n")))

    @property
    def mean_word_length(self) -> float | None:
        """Over space-delimited words only; None (the length rules pass) when most words are unspaced-script
        characters, for which the Gopher word-length bounds mean nothing."""
        if self._mean is None:
            self._mean = (self._mean_word_length(),)
        return self._mean[0]

    def _mean_word_length(self) -> float | None:
        words = self.words
        if not self.unspaced:  # the common case: every word is spaced, so sum the lengths in C
            return len("".join(words)) / len(words) if words else 0.0
        spaced = [w for w in words if not _UNSPACED.match(w)]
        if not words or len(spaced) * 2 < len(words):
            return None if words else 0.0
        return sum(map(len, spaced)) / len(spaced)


class Rule(Protocol):
    name: str

    def keep(self, doc: DocView) -> bool: ...


def _dup_fraction(items: list[str]) -> float:
    """Fraction of items that repeat an earlier item (the first occurrence is not a duplicate)."""
    return (len(items) - len(set(items))) / len(items) if items else 0.0


@dataclass(frozen=True)
class NotEmpty:
    name: str = "empty"

    def keep(self, doc: DocView) -> bool:
        return bool(doc.text)


@dataclass(frozen=True)
class MinChars:
    threshold: int
    name: str = "min_chars"

    def keep(self, doc: DocView) -> bool:
        return len(doc.text) >= self.threshold


@dataclass(frozen=True)
class MaxChars:
    threshold: int
    name: str = "max_chars"

    def keep(self, doc: DocView) -> bool:
        return len(doc.text) <= self.threshold


@dataclass(frozen=True)
class MinWords:
    threshold: int
    name: str = "min_words"

    def keep(self, doc: DocView) -> bool:
        return len(doc.words) >= self.threshold


@dataclass(frozen=True)
class MinAlphaRatio:
    threshold: float
    name: str = "min_alpha_ratio"

    def keep(self, doc: DocView) -> bool:
        if not doc.words:
            return False
        return 1 - _letterless_words(doc.words) / len(doc.words) >= self.threshold


# Punctuation that clings to words ("end.", "(see", "word,"): stripped before str.isalpha so that such words are
# settled in C too. Stripping non-letters never removes a letter, so a stripped word that is all letters has one.
_CLINGING = ".,;:!?()[]{}\"'\u201c\u201d\u2018\u2019-\u2013\u2014/"


def _letterless_words(words: list[str]) -> int:
    """How many words contain no letter of any script. str.isalpha (after stripping clinging punctuation) settles
    almost every word in C through map/filterfalse, and str.isdecimal the numbers (decimal digits are never
    letters); only the few words left (symbols, mixed) meet the regex."""
    unsettled = list(filterfalse(str.isalpha, map(str.strip, filterfalse(str.isalpha, words), repeat(_CLINGING))))
    numbers = sum(map(str.isdecimal, unsettled))
    return numbers + sum(1 for w in filterfalse(str.isdecimal, unsettled) if not _HAS_LETTER.search(w))


@dataclass(frozen=True)
class MinMeanWordLength:
    threshold: float
    name: str = "min_mean_word_length"

    def keep(self, doc: DocView) -> bool:
        return doc.mean_word_length is None or doc.mean_word_length >= self.threshold


@dataclass(frozen=True)
class MaxMeanWordLength:
    threshold: float
    name: str = "max_mean_word_length"

    def keep(self, doc: DocView) -> bool:
        return doc.mean_word_length is None or doc.mean_word_length <= self.threshold


@dataclass(frozen=True)
class MinPunctLineRatio:
    threshold: float
    name: str = "min_punct_line_ratio"

    def keep(self, doc: DocView) -> bool:
        if not doc.lines:
            return False
        ending = sum(map(str.endswith, doc.lines, repeat(_TERMINAL_PUNCT)))
        return ending / len(doc.lines) >= self.threshold


@dataclass(frozen=True)
class MaxDupLineRatio:
    threshold: float
    name: str = "max_dup_line_ratio"

    def keep(self, doc: DocView) -> bool:
        return _dup_fraction(doc.lines) <= self.threshold


@dataclass(frozen=True)
class MaxDupParagraphRatio:
    threshold: float
    name: str = "max_dup_paragraph_ratio"

    def keep(self, doc: DocView) -> bool:
        return _dup_fraction(doc.paragraphs) <= self.threshold


# Cheap rules first: most rejected documents (stubs) fail on length before any word statistics are computed.
_RULES_BY_FIELD: list[tuple[str, type]] = [
    ("min_chars", MinChars),
    ("max_chars", MaxChars),
    ("min_words", MinWords),
    ("min_alpha_ratio", MinAlphaRatio),
    ("min_mean_word_length", MinMeanWordLength),
    ("max_mean_word_length", MaxMeanWordLength),
    ("min_punct_line_ratio", MinPunctLineRatio),
    ("max_dup_line_ratio", MaxDupLineRatio),
    ("max_dup_paragraph_ratio", MaxDupParagraphRatio),
]

RULE_NAMES: tuple[str, ...] = ("empty",) + tuple(name for name, _ in _RULES_BY_FIELD)


def build_rules(cfg: FilterConfig) -> list[Rule]:
    """The enabled rules in evaluation order; a threshold of None disables its rule. Empty documents always go."""
    rules: list[Rule] = [NotEmpty()]
    for name, cls in _RULES_BY_FIELD:
        threshold = getattr(cfg, name)
        if threshold is not None:
            rules.append(cls(threshold))
    return rules


def first_failed_rule(text: str, rules: list[Rule]) -> str | None:
    """The name of the first rule the document fails, or None if it passes all of them."""
    return first_failed(DocView(text), rules)


def first_failed(doc: DocView, rules: list[Rule]) -> str | None:
    """`first_failed_rule` on a view the caller keeps, to reuse what the rules computed (its words)."""
    for rule in rules:
        if not rule.keep(doc):
            return rule.name
    return None
