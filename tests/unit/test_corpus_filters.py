"""Each document filter on documents that pass and fail it, and the rule order and names."""

from __future__ import annotations

import pytest

from bertscale.config import FilterConfig
from bertscale.corpus.filters import RULE_NAMES, build_rules, first_failed_rule

GOOD = ("The quick brown fox jumps over the lazy dog near the river bank. " * 10).strip()
NONE = dict(min_chars=None, max_chars=None, min_words=None, min_alpha_ratio=None, min_mean_word_length=None,
            max_mean_word_length=None, min_punct_line_ratio=None, max_dup_line_ratio=None,
            max_dup_paragraph_ratio=None)


def only(**kw) -> list:
    return build_rules(FilterConfig(**{**NONE, **kw}))


@pytest.mark.parametrize("rule,threshold,bad", [
    ("min_chars", 50, "short text"),
    ("max_chars", 100, GOOD),
    ("min_words", 20, "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"),
    ("min_alpha_ratio", 0.8, "12 34 56 78 90 11 22 33 alpha beta"),
    ("min_mean_word_length", 3.0, "a b c d e f g h i j k l m n o p"),
    ("max_mean_word_length", 10.0, "supercalifragilistic " * 10),
    ("min_punct_line_ratio", 0.5, "no punctuation here\nnor here\nor here."),
    ("max_dup_line_ratio", 0.3, "same line\nsame line\nsame line\nother line."),
    ("max_dup_paragraph_ratio", 0.3, "para one.\n\npara one.\n\npara one.\n\npara two."),
])
def test_each_rule_drops_its_case_and_keeps_good_text(rule, threshold, bad):
    rules = only(**{rule: threshold})
    assert first_failed_rule(bad, rules) == rule
    if rule != "max_chars":
        assert first_failed_rule(GOOD, rules) is None


def test_empty_documents_always_fail_first():
    assert first_failed_rule("", build_rules(FilterConfig())) == "empty"


def test_rules_run_in_order_and_none_disables():
    rules = build_rules(FilterConfig(min_chars=10_000, min_words=10_000))
    assert first_failed_rule(GOOD, rules) == "min_chars"
    assert [r.name for r in build_rules(FilterConfig(**NONE))] == ["empty"]
    assert set(RULE_NAMES) == {r.name for r in build_rules(FilterConfig(min_punct_line_ratio=0.1))}


def test_alpha_ratio_counts_words_with_any_letter():
    rules = only(min_alpha_ratio=0.6)  # 4 of 6 words below have a letter
    assert first_failed_rule("1990) (born x2 über naïve 2020", rules) is None
    assert first_failed_rule("1990 2000 3000 word", rules) == "min_alpha_ratio"
