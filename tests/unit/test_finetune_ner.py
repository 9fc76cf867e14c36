"""Token classification: entity decoding and scores (hand-computed cases, and equal to seqeval's default mode on
random tag sequences), CoNLL/JSONL reading and writing with errors that name the file and line, and the windows
that map words to sub-words and back."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
from pydantic import ValidationError

from bertscale.config import CustomTaskConfig, TokenizerConfig
from bertscale.errors import ConfigError, InputError
from bertscale.finetune import ner
from bertscale.finetune.conll import read_conll, read_token_jsonl, write_conll, write_token_jsonl
from bertscale.finetune.tagging import check_tag, entity_counts, get_entities, ner_metrics, token_accuracy
from bertscale.finetune.tasks import get_task, load_eval, load_test, load_train
from bertscale.tokenizer import special_ids, train_wordpiece

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


# ----------------------------------------------------------------------------------------------------------------
# Entities and scores
# ----------------------------------------------------------------------------------------------------------------
def test_entities_of_each_scheme_by_hand():
    assert get_entities([["B-PER", "I-PER", "O", "B-LOC"]]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # IOB1: I- starts an entity; B- only separates two adjacent entities of one type.
    assert get_entities([["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]) == [("PER", 0, 1), ("PER", 2, 2),
                                                                         ("LOC", 4, 4)]
    # BIOES: S- is a one-token entity, E- closes one.
    assert get_entities([["S-PER", "B-ORG", "I-ORG", "E-ORG", "O", "S-LOC"]]) == [("PER", 0, 0), ("ORG", 1, 3),
                                                                                  ("LOC", 5, 5)]
    # A change of type ends an entity even without B-; sentences never share one (offsets over "sentence + O").
    assert get_entities([["B-PER", "I-LOC"], ["I-LOC"]]) == [("PER", 0, 0), ("LOC", 1, 1), ("LOC", 3, 3)]


def test_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-LOC"]]
    # gold: PER(0-1), LOC(3), ORG(5); predicted: PER(0-1), ORG(3), ORG(5), LOC(6): 2 correct of 4 predicted, 3 gold
    metrics, support = ner_metrics(gold, pred)
    assert metrics["precision"] == pytest.approx(2 / 4) and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3)) == metrics["score"]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["PER.f1"] == 1.0 and metrics["LOC.recall"] == 0.0 and metrics["LOC.precision"] == 0.0
    assert metrics["ORG.precision"] == 0.5 and metrics["ORG.recall"] == 1.0
    assert support == {"LOC": 1, "ORG": 1, "PER": 1}
    # No entity predicted, none gold: zeros, not NaN (seqeval's zero_division).
    assert ner_metrics([["O"]], [["O"]])[0]["f1"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        entity_counts([["O", "O"]], [["O"]])


def _random_tags(rng: random.Random, n: int) -> list[list[str]]:
    tags = ["O", "O", "O"] + [f"{p}-{t}" for p in "BIES" for t in ("PER", "LOC", "MISC")]
    return [[rng.choice(tags) for _ in range(rng.randint(0, 9))] for _ in range(n)]


def test_equal_to_seqeval_default_mode_on_random_sequences():
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval (dev extra) is not installed")
    from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

    rng = random.Random(0)
    for _ in range(200):
        gold, pred = _random_tags(rng, 6), _random_tags(rng, 6)
        pred = [p[: len(g)] + ["O"] * (len(g) - len(p)) for g, p in zip(gold, pred)]
        assert get_entities(gold) == seqeval_entities(gold)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns on zero division; we return 0 as it does
            metrics, support = ner_metrics(gold, pred)
            assert metrics["precision"] == seqeval.precision_score(gold, pred)
            assert metrics["recall"] == seqeval.recall_score(gold, pred)
            assert metrics["f1"] == seqeval.f1_score(gold, pred)
            if any(gold):
                assert token_accuracy(gold, pred) == seqeval.accuracy_score(gold, pred)
            report = seqeval.classification_report(gold, pred, output_dict=True)
        for kind, row in report.items():
            if kind.endswith(" avg"):
                continue
            assert metrics[f"{kind}.precision"] == pytest.approx(row["precision"], abs=1e-12)
            assert metrics[f"{kind}.recall"] == pytest.approx(row["recall"], abs=1e-12)
            assert metrics[f"{kind}.f1"] == pytest.approx(row["f1-score"], abs=1e-12)
            assert support.get(kind, 0) == row["support"]


def test_tag_checks_per_scheme():
    assert check_tag("O", "iob2") is None and check_tag("B-PER", "iob1") is None
    assert check_tag("S-PER", "bioes") is None
    assert "IOB2" in check_tag("S-PER", "iob2")
    assert check_tag("PER", "bioes") and check_tag("B-", "iob2")


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------
def test_conll_reading_skips_docstart_and_splits_on_blank_lines(tmp_path):
    path = tmp_path / "eng.testa"
    path.write_text(CONLL)
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"],
                                             ["BRUSSELS", "1996-08-22"]]
    assert sentences[1].tags == ["B-PER", "I-PER"] and sentences[1].lineno == 9
    assert [s.tags for s in read_conll(path, tag_column=1)][2] == ["NNP", "CD"]
    assert read_conll(path, labelled=False)[0].tags is None


def test_conll_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(InputError, match=r"bad.conll:2: .*no tag"):
        read_conll(path)
    assert read_conll(path, labelled=False)[0].tokens == ["EU", "rejects"]
    with pytest.raises(InputError, match=r"bad.conll:1: no tag column 5"):
        read_conll(path, tag_column=5)


def test_jsonl_reading_and_its_errors(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text(json.dumps({"id": "a", "words": ["Rome", "wins"], "ner": ["B-LOC", "O"]}) + "\n\n"
                    + json.dumps({"id": "b", "words": ["x"], "ner": ["O"]}) + "\n")
    sentences = read_token_jsonl(path, "words", "ner", "id")
    assert [(s.idx, s.tokens, s.tags, s.lineno) for s in sentences] == [
        ("a", ["Rome", "wins"], ["B-LOC", "O"], 1), ("b", ["x"], ["O"], 3)]
    path.write_text(json.dumps({"tokens": ["Rome", "wins"], "tags": ["B-LOC"]}) + "\n")
    with pytest.raises(InputError, match=r"ner.jsonl:1: 1 tags for 2 tokens"):
        read_token_jsonl(path)
    path.write_text(json.dumps({"tokens": "Rome wins", "tags": []}) + "\n")
    with pytest.raises(InputError, match=r"ner.jsonl:1: 'tokens' must be a list of strings"):
        read_token_jsonl(path)
    path.write_text(json.dumps({"tokens": ["Rome"]}) + "\n")
    with pytest.raises(InputError, match=r"ner.jsonl:1: no 'tags' key"):
        read_token_jsonl(path)


def test_task_loading_checks_the_scheme_and_ids(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(CONLL)
    config = CustomTaskConfig(name="ner", train=str(path), dev=str(path), test=str(path), kind="token_classification")
    task = get_task("ner", [config])
    assert task.labels == ("O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER") and task.fmt == "conll"
    assert load_train(task, None).dataset["tags"][1] == ["B-PER", "I-PER"]
    assert "tags" not in load_test(task, None)[0].dataset.column_names
    path.write_text("Peter S-PER\n")
    with pytest.raises(InputError, match=r"train.conll: sentence 0 \(line 1\), token 1 'Peter': tag 'S-PER'"):
        get_task("ner", [config])
    bioes = config.model_copy(update={"tag_scheme": "bioes"})
    assert get_task("ner", [bioes]).labels == ("O", "S-PER")
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": "1", "tokens": ["a"], "tags": ["B-X"]}) + "\n" for _ in range(2)))
    with pytest.raises(InputError, match=r"dup.jsonl:2: id '1' is used again"):
        get_task("d", [CustomTaskConfig(name="d", train=str(dup), kind="token_classification", index="id")])
    with pytest.raises(ConfigError, match="labels: tag 'PER'"):
        get_task("x", [CustomTaskConfig(name="x", train=str(dup), kind="token_classification", labels=["O", "PER"])])
    only_o = tmp_path / "o.conll"
    only_o.write_text("a O\n")
    with pytest.raises(InputError, match="at least one entity tag"):
        get_task("o", [CustomTaskConfig(name="o", train=str(only_o), kind="token_classification")])
    empty = tmp_path / "empty.conll"
    empty.write_text("-DOCSTART- O\n\n")
    with pytest.raises(InputError, match="empty.conll has no sentences"):
        load_eval(get_task("ner", [config.model_copy(update={"dev": str(empty), "labels": ["O", "B-PER"]})]), None)


def test_config_rejects_fields_of_another_kind():
    with pytest.raises(ValidationError, match="tag_scheme not used by kind classification"):
        CustomTaskConfig(name="x", train="a.csv", tag_scheme="bioes")
    with pytest.raises(ValidationError, match="format 'csv' does not fit kind token_classification"):
        CustomTaskConfig(name="x", train="a.csv", kind="token_classification", format="csv")
    with pytest.raises(ValidationError, match="max_answer_length not used by kind token_classification"):
        CustomTaskConfig(name="x", train="a.conll", kind="token_classification", max_answer_length=10)
    dumped = CustomTaskConfig(name="x", train="a.conll", kind="token_classification", tag_scheme="iob1").model_dump()
    assert CustomTaskConfig(**dumped).tag_scheme == "iob1"  # a dumped config repeats every default


def test_predictions_written_back_in_the_input_layout(tmp_path):
    path = tmp_path / "test.conll"
    path.write_text(CONLL.replace(" ", "\t"))
    predicted = {"0": ["B-ORG", "O", "O", "O", "O"], "2": ["B-LOC", "B-MISC"]}  # sentence 1 not predicted
    out = write_conll(path, tmp_path / "out.conll", predicted)
    lines = out.read_text().splitlines()
    assert lines[0] == "-DOCSTART-\t-X-\t-X-\tO" and lines[2] == "EU\tNNP\tB-NP\tB-ORG\tB-ORG"
    assert [s.tags for s in read_conll(out)] == [predicted["0"], predicted["2"]]
    assert [s.tags for s in read_conll(out, tag_column=-2)] == [["B-ORG", "O", "B-MISC", "O", "O"], ["B-LOC", "O"]]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"tokens": ["a", "b"], "extra": 1}) + "\n" + json.dumps({"tokens": ["c"]}) + "\n")
    out = write_token_jsonl(src, tmp_path / "out.jsonl", {"1": ["B-X"]})
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"tokens": ["c"], "predicted_tags": ["B-X"]}]


# ----------------------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------------------
def test_windows_cover_every_word_and_advance():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(1, 4) for _ in range(rng.randint(0, 30))]
        capacity, stride = rng.randint(4, 12), rng.randint(1, 12)
        windows = ner.cut_windows(counts, capacity, stride)
        covered = {w for start, end in windows for w in range(start, end)}
        assert covered == set(range(len(counts)))
        assert all(sum(counts[s:e]) <= capacity for s, e in windows)
        assert all(a[0] < b[0] for a, b in zip(windows, windows[1:]))
    assert ner.cut_windows([1] * 10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert ner.cut_windows([], 4, 2) == [(0, 0)] and ner.cut_windows([2, 2, 2], 4, 0) == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="1 to 4 sub-words"):
        ner.cut_windows([1, 5], 4, 2)
    # Each word is read from the window where its shorter side has the most context.
    owners = ner._owners([1] * 10, [(0, 4), (2, 6), (4, 8), (6, 10)], 0)
    assert owners[0] == (0, 1) and owners[3] == (1, 2) and owners[5] == (2, 2) and owners[9] == (3, 4)


@pytest.fixture(scope="module")
def tokenizer():
    text = ["the quick brown fox jumps over the lazy dog", "peter blackburn visited brussels yesterday"] * 20
    return train_wordpiece(TokenizerConfig(vocab_size=70, min_frequency=1), iter([text]))


def test_labels_on_first_sub_words_and_windows_over_long_sentences(tokenizer):
    ids = special_ids(tokenizer)
    words = ["Blackburnville", "visited", "\x00", "Brussels"] * 3
    tags = ["B-PER", "O", "O", "B-LOC"] * 3
    labels = {"O": 0, "B-LOC": 1, "B-PER": 2}
    data = ner.encode_sentences("dev", ["0"], [words], [tags], tokenizer, ids, max_length=12, stride=4,
                                label_ids=labels)
    pieces = ner.word_pieces(tokenizer, [words], ids["unk"])[0]
    assert pieces[2] == [ids["unk"]]  # a word with no sub-word is read as [UNK]
    assert len(data) > 1 and all(n <= 12 for n in data.lengths)
    for window, window_labels in zip(data.input_ids, data.labels):
        assert window[0] == ids["cls"] and window[-1] == ids["sep"] and len(window_labels) == len(window)
    owners = data.owners[0]
    assert len(owners) == len(words)
    for word, (w, pos) in enumerate(owners):
        assert data.labels[w][pos] == labels[tags[word]]
        assert data.input_ids[w][pos] == pieces[word][0]
    # One label per word overall, the rest -100 (words in two windows are labelled in both).
    first = sum(1 for w in data.labels for x in w if x != ner.IGNORE)
    assert first >= len(words)
    # Predicting through the owners gives each word its label back from logits that put it there.
    logits = [np.eye(3)[np.maximum(np.asarray(x), 0)] for x in data.labels]
    assert ner.tags_from_logits(data, logits, ["O", "B-LOC", "B-PER"]) == [tags]


def test_entities_as_records():
    words = ["Peter", "Blackburn", "visited", "Brussels"]
    assert ner.entities(words, ["B-PER", "I-PER", "O", "B-LOC"]) == [
        {"entity": "PER", "start_word": 0, "end_word": 1, "text": "Peter Blackburn"},
        {"entity": "LOC", "start_word": 3, "end_word": 3, "text": "Brussels"}]
