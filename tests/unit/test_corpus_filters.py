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


CHINESE = ("北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。北京有很多博物馆、公园和古老的胡同，"
           "每年吸引大量来自世界各地的游客。故宫、天坛和长城都是著名的景点，") * 3
JAPANESE = ("東京は日本の首都であり、人口は約千四百万人で世界でも有数の大都市です。多くの博物館や公園があり、"
            "毎年たくさんの観光客が訪れます。浅草寺やスカイツリーは特に人気があります。") * 3
THAI = ("กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย มีประชากรจำนวนมาก และมีวัดวาอารามที่สวยงามมากมาย "
        "นักท่องเที่ยวจากทั่วโลกนิยมมาเยือนทุกปี ") * 3


@pytest.mark.parametrize("text", [CHINESE, JAPANESE, THAI])
def test_scripts_without_spaces_pass_the_default_filters(text):
    # split() saw one or two huge "words": min_words=30 and max_mean_word_length dropped every such document.
    assert len(text) >= 200
    assert first_failed_rule(text, build_rules(FilterConfig())) is None


def test_unspaced_script_characters_count_as_words():
    from bertscale.corpus.filters import DocView

    assert len(DocView("東京は首都").words) == 5
    assert DocView("東京 Tower").words == ["東", "京", "Tower"]
    assert DocView("กรุงเทพ").words == ["ก", "รุ", "ง", "เ", "ท", "พ"]  # marks stay with their consonant
    assert first_failed_rule("東京は首都。" * 4, only(min_words=30)) == "min_words"  # 24 words
    assert first_failed_rule("東京は首都。" * 5, only(min_words=30)) is None  # 30 words


@pytest.mark.parametrize("word", ["word", "word,", "(see", "\u201cquoted\u201d", "1990", "1990s", "x2", "\u00bd",
                                  "\u00b2", "\u2167", "__", "\u2014", "--", "", "a1", "men's", "\u0661\u0662",
                                  "\u6771\u4eac", "\u00fcber", "\u00a7\u00a7", "3.14", "&", "...", "_a_"])
def test_letterless_word_count_matches_the_letter_definition(word):
    # The fast path (isalpha after stripping clinging punctuation, isdecimal for numbers) must count exactly the
    # words in which the regex finds no letter: "\u00b2" and "\u2167" are not decimal digits, so they count as
    # letters there, as before.
    from bertscale.corpus.filters import _HAS_LETTER, _letterless_words

    assert _letterless_words([word]) == (0 if _HAS_LETTER.search(word) else 1)


def test_split_words_are_offered_only_when_they_are_str_split():
    from bertscale.corpus.filters import DocView

    spaced = DocView("Some plain words here.")
    assert spaced.split_words is None  # not computed yet
    assert spaced.words == spaced.split_words == "Some plain words here.".split()
    unspaced = DocView("東京 Tower")
    assert unspaced.words and unspaced.split_words is None  # _WORD.findall, not str.split
