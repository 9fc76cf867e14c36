"""Document quality filters in the spirit of Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020).

Each rule is a small object with a `name` and a `keep(doc)` method over a `DocView`, which computes words, lines and
paragraphs once per document. A document is dropped by the first rule it fails, and the stage counts drops per
rule name, so every rule's effect is visible in the manifest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from itertools import filterfalse
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
    """Lazily computed statistics of one cleaned document, shared by all rules."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def unspaced(self) -> bool:
        """Whether the text has characters of scripts written without spaces (checked once, in C)."""
        return not self.text.isascii() and _UNSPACED.search(self.text) is not None

    @cached_property
    def words(self) -> list[str]:
        return _WORD.findall(self.text) if self.unspaced else self.text.split()

    @cached_property
    def lines(self) -> list[str]:
        return [line for line in self.text.split("\n") if line]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p for p in self.text.split("\n\n") if p]

    @cached_property
    def mean_word_length(self) -> float | None:
        """Over space-delimited words only; None (the length rules pass) when most words are unspaced-script
        characters, for which the Gopher word-length bounds mean nothing."""
        if not self.unspaced:  # the common case: every word is spaced, so sum the lengths in C
            return sum(map(len, self.words)) / len(self.words) if self.words else 0.0
        spaced = [w for w in self.words if not _UNSPACED.match(w)]
        if not self.words or len(spaced) * 2 < len(self.words):
            return None if self.words else 0.0
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
        # str.isalpha settles most words in C (filterfalse skips them without a Python-level step); only words
        # with digits or punctuation need the regex.
        non_alpha = sum(1 for w in filterfalse(str.isalpha, doc.words) if not _HAS_LETTER.search(w))
        return 1 - non_alpha / len(doc.words) >= self.threshold


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
        ending = sum(1 for line in doc.lines if line.endswith(_TERMINAL_PUNCT))
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
    doc = DocView(text)
    for rule in rules:
        if not rule.keep(doc):
            return rule.name
    return None
