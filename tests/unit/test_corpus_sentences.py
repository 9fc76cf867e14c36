"""The rule-based sentence splitter: abbreviations, initials, decimals, ellipses, quotes and paragraphs."""

from __future__ import annotations

from bertscale.corpus.sentences import split_sentences


def test_basic_terminal_punctuation():
    assert split_sentences("It rained. Did it? Yes! Then it stopped.") == [
        "It rained.", "Did it?", "Yes!", "Then it stopped."]


def test_abbreviations_initials_and_decimals_do_not_split():
    text = "Dr. Smith met J. R. R. Tolkien in the U.S. on Jan. 5. The value was 3.14 exactly. See e.g. Fig. 2."
    assert split_sentences(text) == [
        "Dr. Smith met J. R. R. Tolkien in the U.S. on Jan. 5.", "The value was 3.14 exactly.", "See e.g. Fig. 2."]


def test_quotes_brackets_and_ellipses():
    text = '"Stop." She left. (He stayed.) Wait... and then... Nothing happened.'
    assert split_sentences(text) == ['"Stop."', "She left.", "(He stayed.)", "Wait... and then...",
                                     "Nothing happened."]


def test_lowercase_continuation_is_not_a_boundary():
    assert split_sentences("It cost approx. five dollars. Next one.") == ["It cost approx. five dollars.",
                                                                          "Next one."]


def test_paragraphs_and_hard_wrapped_lines():
    text = "A line that is\nhard wrapped in the middle.\nHeading.\nNext paragraph line\n\nNew para"
    assert split_sentences(text) == ["A line that is hard wrapped in the middle.", "Heading.",
                                     "Next paragraph line", "New para"]


def test_short_sentences_are_merged():
    assert split_sentences("Hi. A much longer sentence follows here. Ok.", min_chars=10) == [
        "Hi. A much longer sentence follows here. Ok."]
    assert split_sentences("") == []


def test_cjk_terminals_end_sentences_without_a_space():
    assert split_sentences("東京は日本の首都です。人口は多い！本当ですか？はい。") == [
        "東京は日本の首都です。", "人口は多い！", "本当ですか？", "はい。"]
    assert split_sentences("北京很大。上海也很大。") == ["北京很大。", "上海也很大。"]
    # A quoted sentence that runs on into its own sentence does not end it.
    assert split_sentences("「はい。」と答えた。「次。」") == ["「はい。」と答えた。", "「次。」"]


def test_devanagari_danda_ends_sentences_with_or_without_a_space():
    assert split_sentences("यह पहला वाक्य है।यह दूसरा है। और तीसरा॥") == [
        "यह पहला वाक्य है।", "यह दूसरा है।", "और तीसरा॥"]


def test_a_hard_wrapped_cjk_line_ending_in_a_full_stop_closes_its_block():
    assert split_sentences("第一行は終わり。\n次の行") == ["第一行は終わり。", "次の行"]
