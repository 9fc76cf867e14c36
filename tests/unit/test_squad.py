"""Unit tests of SQuAD loading, windowed features, span decoding and the official metrics."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import random
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from bertscale.config import TokenizerConfig
from bertscale.errors import ConfigError, InputError
from bertscale.finetune.squad import (
    SquadExample,
    apply_null_threshold,
    decode,
    load_squad,
    make_features,
    normalize_answer,
    squad_evaluate,
    write_predictions,
)
from bertscale.tokenizer import train_wordpiece

REPO = Path(__file__).resolve().parents[2]
TASK_DATA = Path(os.environ.get("BERTSCALE_TASK_DATA", REPO / ".task-data"))

CONTEXT = (
    "The old mill stood on the north bank of the river Arden, two miles above the town of Kestrel. It was built "
    "in 1742 by a family of weavers who had come from the coast, and for ninety years it ground the grain of every "
    "farm in the valley. In the winter of 1836 a flood carried away the wheel and half of the western wall. The "
    "owners, already in debt, sold the ruin to the county, which turned the yard into a market. Today the market "
    "opens on Saturdays, and the stones of the old wall mark the edge of the car park. Visitors who walk along the "
    "river can still see the channel that once fed the wheel, now filled with reeds and the nests of moorhens."
)
QUESTIONS = [
    ("q-built", "When was the mill built?", "1742"),
    ("q-flood", "What did the flood of 1836 carry away?", "the wheel and half of the western wall"),
    ("q-market", "On which days does the market open?", "Saturdays"),
    ("q-nests", "Whose nests fill the old channel?", "moorhens"),
]


@pytest.fixture(scope="module")
def tok():
    texts = [CONTEXT] + [q for _, q, _ in QUESTIONS] + ["Atop the dome is a golden statue of the Virgin Mary."]
    return train_wordpiece(TokenizerConfig(vocab_size=400, min_frequency=1), iter([texts * 5]))


def _example(qid: str, question: str, answer: str | None, context: str = CONTEXT) -> SquadExample:
    if answer is None:
        return SquadExample(qid, "Mill", question, context, (), is_impossible=True)
    return SquadExample(qid, "Mill", question, context, ((answer, context.index(answer)),))


def _examples() -> list[SquadExample]:
    return [_example(*q) for q in QUESTIONS]


def _write(tmp_path: Path, data: object, name: str = "squad.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _squad(qas: list[dict], context: object = "Paris is the capital of France.", **top) -> dict:
    return {"data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}], **top}


# ----------------------------------------------------------------------------------------------------------------
# Metrics: hand-computed cases
# ----------------------------------------------------------------------------------------------------------------
def test_normalize_answer() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"
    assert normalize_answer("theatre anthem") == "theatre anthem"  # articles only as whole words
    assert normalize_answer(" The ") == ""


def test_v1_metrics_by_hand() -> None:
    examples = [
        SquadExample("a", "", "q", "c", (("the Eiffel Tower", 0), ("Eiffel Tower in Paris", 0))),
        SquadExample("b", "", "q", "c", (("Denver Broncos", 0),)),
        SquadExample("c", "", "q", "c", (("1858", 0),)),
    ]
    # a: exact after normalisation; b: 1 of 2 gold tokens, precision 1 -> F1 2/3; c: no prediction, scores 0.
    result = squad_evaluate(examples, {"a": "Eiffel tower!", "b": "the Broncos"}, version="1.1")
    assert result == pytest.approx({"exact": 100 / 3, "f1": 100 * (1 + 2 / 3) / 3, "total": 3})


def test_v1_and_v2_differ_where_the_official_scripts_do() -> None:
    # A gold answer that normalises to nothing: v1.1 keeps it (EM 1, F1 0 for an empty prediction); v2.0 replaces
    # it by "" and gives F1 1.
    examples = [SquadExample("a", "", "q", "c", (("The", 0),))]
    assert squad_evaluate(examples, {"a": ""}, version="1.1") == {"exact": 100.0, "f1": 0.0, "total": 1}
    v2 = squad_evaluate(examples, {"a": ""}, version="2.0")
    assert (v2["exact"], v2["f1"], v2["total"]) == (100.0, 100.0, 1)


def _v2_case() -> tuple[list[SquadExample], dict[str, str], dict[str, float]]:
    examples = [
        SquadExample("q1", "", "q", "c", (("golden statue", 0),)),
        SquadExample("q2", "", "q", "c", (("1858", 0),)),
        SquadExample("q3", "", "q", "c", (), is_impossible=True),
        SquadExample("q4", "", "q", "c", (), is_impossible=True),
    ]
    predictions = {"q1": "a golden statue", "q2": "", "q3": "", "q4": "something"}
    null_odds = {"q1": -2.0, "q2": 1.0, "q3": 3.0, "q4": 0.5}
    return examples, predictions, null_odds


def test_v2_metrics_by_hand() -> None:
    examples, predictions, null_odds = _v2_case()
    result = squad_evaluate(examples, predictions)
    assert result == pytest.approx({"exact": 50.0, "f1": 50.0, "total": 4, "HasAns_exact": 50.0, "HasAns_f1": 50.0,
                                    "HasAns_total": 2, "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2})
    # Best threshold: start from "all no answer" (2 right), then answer in order of rising odds:
    # q1 (-2.0) +1 -> 3, q4 (0.5) -1 -> 2, q2 (1.0) +0, q3 (3.0) +0; the best is 3/4 at -2.0.
    with_odds = squad_evaluate(examples, predictions, null_odds)
    assert with_odds["best_exact"] == pytest.approx(75.0)
    assert with_odds["best_exact_thresh"] == -2.0
    assert with_odds["best_f1"] == pytest.approx(75.0)
    assert with_odds["exact"] == pytest.approx(50.0)  # no threshold: the predictions as they are
    # The official --na-prob-thresh: odds above 0 count as "no answer": q2 stays wrong, q3 right, q4 now right.
    thresholded = squad_evaluate(examples, predictions, null_odds, threshold=0.0)
    assert thresholded["exact"] == pytest.approx(75.0)
    assert thresholded["NoAns_exact"] == pytest.approx(100.0)


def test_v2_missing_predictions_are_left_out_and_bad_odds_rejected(caplog) -> None:
    examples, predictions, _ = _v2_case()
    del predictions["q4"]
    with caplog.at_level(logging.WARNING):
        result = squad_evaluate(examples, predictions)
    assert result["total"] == 3 and result["NoAns_total"] == 1
    assert "q4" in caplog.text
    with pytest.raises(InputError, match="null odds lack"):
        squad_evaluate(examples, predictions, {"q1": 0.0})
    with pytest.raises(InputError, match="no question has a prediction"):
        squad_evaluate(examples, {})


def test_v1_rejects_unanswered_gold_and_null_odds() -> None:
    examples = [SquadExample("a", "", "q", "c", ())]
    with pytest.raises(InputError, match="no gold answer"):
        squad_evaluate(examples, {"a": ""}, version="1.1")
    with pytest.raises(ValueError, match="SQuAD 2.0 only"):
        squad_evaluate([SquadExample("a", "", "q", "c", (("x", 0),))], {"a": "x"}, {"a": 0.0}, version="1.1")


# ----------------------------------------------------------------------------------------------------------------
# Metrics: the official scripts
# ----------------------------------------------------------------------------------------------------------------
def _official(version: str):
    path = TASK_DATA / "reference" / f"evaluate-v{version}.py"
    if not path.is_file():
        pytest.skip(f"official SQuAD script not found at {path}; run scripts/fetch_task_data.sh")
    spec = importlib.util.spec_from_file_location(f"official_squad_v{version}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_set(seed: int, impossible: float) -> tuple[dict, list[SquadExample], dict[str, str], dict[str, float]]:
    """Questions with gold answers built from case, punctuation and article variants, and noisy predictions."""
    rng = random.Random(seed)
    words = ["the", "a", "an", "river", "Arden", "mill", "1742", "weavers", "coast", "flood", "wheel", "wall",
             "market", "U.S.", "co-op", "Saturday's", "ninety", "years"]
    qas, examples, predictions, null_odds = [], [], {}, {}
    for i in range(300):
        qid = f"q{i}"
        golds = [] if rng.random() < impossible else [
            " ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        qas.append({"id": qid, "question": "?", "answers": [{"text": g, "answer_start": 0} for g in golds]})
        examples.append(SquadExample(qid, "", "?", "c", tuple((g, 0) for g in golds), not golds))
        choice = rng.random()
        if golds and choice < 0.3:
            pred = rng.choice(golds).upper() + rng.choice(["", ".", "!"])
        elif choice < 0.5:
            pred = ""
        else:
            pred = " ".join(rng.choices(words, k=rng.randint(1, 4)))
        predictions[qid] = pred
        null_odds[qid] = round(rng.uniform(-3, 3), 1)  # ties on purpose: the search must break them the same way
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}, \
        examples, predictions, null_odds


def test_v1_equals_official_script() -> None:
    official = _official("1.1")
    dataset, examples, predictions, _ = _random_set(seed=1, impossible=0.0)
    for qid in list(predictions)[::7]:
        del predictions[qid]  # v1.1 scores missing predictions 0
    expected = official.evaluate(dataset["data"], predictions)
    ours = squad_evaluate(examples, predictions, version="1.1")
    assert ours["exact"] == pytest.approx(expected["exact_match"], abs=1e-9)
    assert ours["f1"] == pytest.approx(expected["f1"], abs=1e-9)
    assert ours["exact"] != ours["f1"]


@pytest.mark.parametrize("threshold", [None, 1.0, 0.0, -0.5])
def test_v2_equals_official_script(tmp_path: Path, threshold: float | None) -> None:
    official = _official("2.0")
    dataset, examples, predictions, null_odds = _random_set(seed=2, impossible=0.35)
    files = {name: _write(tmp_path, data, f"{name}.json")
             for name, data in (("data", dataset), ("pred", predictions), ("na_prob", null_odds))}
    out = tmp_path / "eval.json"
    # None means "predictions as they are", which the official script gets with a threshold above every odds.
    official.OPTS = Namespace(data_file=files["data"], pred_file=files["pred"], na_prob_file=files["na_prob"],
                              na_prob_thresh=1e9 if threshold is None else threshold, out_file=out,
                              out_image_dir=None, verbose=False)
    official.main()
    expected = json.loads(out.read_text())
    ours = squad_evaluate(examples, predictions, null_odds, threshold=threshold)
    assert set(ours) == set(expected)
    assert ours == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def test_load_v1_and_v2(tmp_path: Path) -> None:
    qa = {"id": "x1", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]}
    v1 = load_squad(_write(tmp_path, _squad([qa]), "v1.json"))
    assert v1.version == "1.1" and len(v1) == 1 and v1.skipped == {}
    assert v1[0] == SquadExample("x1", "T", qa["question"], "Paris is the capital of France.", (("Paris", 0),))
    impossible = {"id": "x2", "question": "What is the capital of Spain?", "answers": [], "is_impossible": True,
                  "plausible_answers": [{"text": "Paris", "answer_start": 0}]}
    v2 = load_squad(_write(tmp_path, _squad([{**qa, "is_impossible": False}, impossible]), "v2.json"))
    assert v2.version == "2.0" and [e.is_impossible for e in v2] == [False, True] and v2[1].answers == ()
    assert load_squad(_write(tmp_path, _squad([qa], version="v2.0"), "v2b.json")).version == "2.0"


@pytest.mark.parametrize(("qas", "context", "message"), [
    ([{"id": "x", "question": "Q?", "answers": []}], "", "question 'x' has no context"),
    ([{"id": "x", "question": "Q?", "answers": []}], None, "question 'x' has no context"),
    ([{"question": "Q?", "answers": []}], "C", r"qas\[0\] has no string 'id'"),
    ([{"id": "x", "answers": []}], "C", "question 'x' has no 'question'"),
    ([{"id": "x", "question": "Q?"}], "C", "question 'x' has no 'answers' list"),
    ([{"id": "x", "question": "Q?", "answers": [{"answer_start": 0}]}], "C", r"answers\[0\] has no 'text'"),
    ([{"id": "x", "question": "Q?", "answers": [{"text": "C", "answer_start": "0"}]}], "C", "integer 'answer_start'"),
    ([{"id": "x", "question": "Q?", "answers": [], "is_impossible": "yes"}], "C", "'is_impossible' must be"),
    ([{"id": "x", "question": "Q?", "answers": []}, {"id": "x", "question": "R?", "answers": []}], "C", "twice"),
])
def test_bad_records_name_file_and_question(tmp_path: Path, qas, context, message) -> None:
    path = _write(tmp_path, _squad(qas, context))
    with pytest.raises(InputError, match=message) as err:
        load_squad(path)
    assert str(path) in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_squad(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(InputError, match="not valid UTF-8 JSON"):
        load_squad(tmp_path / "broken.json")
    with pytest.raises(InputError, match="no 'data' list"):
        load_squad(_write(tmp_path, {"version": "1.1"}))
    with pytest.raises(InputError, match=r"data\[0\] has no 'paragraphs'"):
        load_squad(_write(tmp_path, {"data": [{"title": "t"}]}))
    with pytest.raises(InputError, match="holds no questions"):
        load_squad(_write(tmp_path, _squad([])))


def test_unaligned_answers_are_kept_for_evaluation_and_left_out_of_training(tmp_path: Path, tok, caplog) -> None:
    context = "Paris is the  capital of France."
    qas = [
        {"id": "ok", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        # Off by the double space, but the words the span touches contain it: the reference keeps it.
        {"id": "loose", "question": "What is it?", "answers": [{"text": "the capital", "answer_start": 9}]},
        {"id": "off", "question": "Where?", "answers": [{"text": "France", "answer_start": 3}]},
        {"id": "past", "question": "Where?", "answers": [{"text": "France", "answer_start": 400}]},
    ]
    with caplog.at_level(logging.WARNING):
        squad = load_squad(_write(tmp_path, _squad(qas, context)))
    assert len(squad) == 4
    assert squad.skipped == {"answer_start_mismatch": 2}
    assert squad.skipped_ids == {"answer_start_mismatch": ["off", "past"]}
    assert "off" in caplog.text and "squad.json" in caplog.text
    features = make_features(squad, tok, max_length=32, doc_stride=4, max_query_length=8, train=True)
    assert features.skipped == {"answer_start_mismatch": 2}
    assert sorted(set(features.example_index.tolist())) == [0, 1]
    assert squad_evaluate(squad, {"ok": "Paris", "loose": "capital", "off": "France", "past": "x"})["exact"] == 75.0


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------
def test_windows_cover_every_context_token_with_the_stride(tok) -> None:
    examples = _examples()
    features = make_features(examples, tok, max_length=48, doc_stride=8, max_query_length=16)
    context_offsets = {tuple(o) for o in tok.encode(CONTEXT, add_special_tokens=False).offsets}
    windows = [f for f in range(len(features)) if features.example_index[f] == 0]
    assert len(windows) > 3
    seen: set[tuple[int, int]] = set()
    previous = None
    for f in windows:
        ctx = [tuple(o) for o in features.offsets[f].tolist() if o[0] >= 0]
        seen.update(ctx)
        if previous is not None:
            assert len(set(previous) & set(ctx)) == 8  # consecutive windows overlap by doc_stride tokens
        previous = ctx
    assert seen == context_offsets
    cls = tok.token_to_id("[CLS]")
    assert (features.input_ids[:, 0] == cls).all()
    assert features.input_ids.shape == (len(features), 48)
    context_mask = features.offsets[:, :, 0] >= 0
    assert (features.token_type_ids[context_mask] == 1).all()
    assert (features.attention_mask[context_mask] == 1).all()
    assert features.start_positions is None
    assert tok.truncation is None  # the caller's tokenizer is left as it was


def test_answer_positions_map_back_to_the_answer_text(tok) -> None:
    examples = _examples() + [_example("q-none", "Who owns the moon?", None)]
    # An answer that starts and ends inside words maps to the tokens that hold its edges.
    examples.append(_example("q-part", "What stood there?", "ill stood on the north ban"))
    features = make_features(examples, tok, max_length=48, doc_stride=8, max_query_length=16, train=True)
    inside = 0
    for f in range(len(features)):
        example = examples[features.example_index[f]]
        s, e = int(features.start_positions[f]), int(features.end_positions[f])
        if example.is_impossible:
            assert (s, e) == (0, 0)
            continue
        text, start = example.answers[0]
        offsets = features.offsets[f]
        covered = offsets[offsets[:, 0] >= 0]
        if covered[0, 0] <= start and covered[-1, 1] >= start + len(text):
            inside += 1
            assert 0 < s <= e
            if example.id == "q-part":
                assert example.context[offsets[s, 0]:offsets[e, 1]] == "mill stood on the north bank"
            else:
                assert example.context[offsets[s, 0]:offsets[e, 1]] == text
        else:
            assert (s, e) == (0, 0)
    assert inside >= len(QUESTIONS) + 1  # every answer is wholly inside at least one window


def test_long_questions_are_cut(tok) -> None:
    question = " ".join(["when was the old mill on the river built"] * 6)
    features = make_features([_example("long", question, "1742")], tok, max_length=64, doc_stride=8,
                             max_query_length=10)
    question_tokens = int((features.token_type_ids[0] == 0).sum() - features.attention_mask[0].tolist().count(0))
    assert question_tokens == 10 + 2  # [CLS] + 10 question tokens + [SEP]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_length": 40, "max_query_length": 40}, "leaves no room"),
    ({"max_length": 64, "doc_stride": 60, "max_query_length": 8}, "doc_stride"),
    ({"max_query_length": 0}, "max_query_length"),
])
def test_bad_lengths(tok, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_features(_examples(), tok, **kwargs)


def test_tokenizer_without_cls_is_rejected(tok) -> None:
    from tokenizers import Tokenizer

    bare = Tokenizer.from_str(tok.to_str())
    bare.post_processor = None
    with pytest.raises(InputError, match=r"\[CLS\]"):
        make_features(_examples(), bare, max_length=48, doc_stride=8, max_query_length=16)


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------
def _logits(features, example: SquadExample, text: str, window: int = -1) -> tuple[np.ndarray, np.ndarray, int]:
    """Logits that point at `text` in the `window`-th of the windows that hold it (the last by default)."""
    start_char = example.context.index(text)
    end_char = start_char + len(text)
    rows = [f for f in range(len(features)) if features.example_index[f] == 0
            and start_char in features.offsets[f, :, 0] and end_char in features.offsets[f, :, 1]]
    f = rows[window]
    offsets = features.offsets[f]
    s = int(np.flatnonzero(offsets[:, 0] == start_char)[0])
    e = int(np.flatnonzero(offsets[:, 1] == end_char)[0])
    start, end = np.zeros(features.input_ids.shape, np.float32), np.zeros(features.input_ids.shape, np.float32)
    start[f, s], end[f, e] = 5.0, 4.0
    return start, end, f


def test_decode_picks_the_span_from_the_logits(tok) -> None:
    example = _example("q-nests", "Whose nests fill the old channel?", "moorhens")
    features = make_features([example], tok, max_length=48, doc_stride=8, max_query_length=16)
    start, end, _ = _logits(features, example, "the nests of moorhens")
    predictions, null_odds = decode([example], features, start, end)
    assert predictions == {"q-nests": "the nests of moorhens"}
    assert null_odds["q-nests"] == pytest.approx(0.0 - 9.0)
    # A span longer than max_answer_length is not a candidate.
    short, _ = decode([example], features, start, end, max_answer_length=2)
    assert short["q-nests"] != "the nests of moorhens"


def test_decode_ignores_question_tokens_and_reversed_spans(tok) -> None:
    example = _example("q-built", "When was the mill built?", "1742")
    features = make_features([example], tok, max_length=48, doc_stride=8, max_query_length=16)
    start, end, f = _logits(features, example, "1742", window=0)
    s = int(np.flatnonzero(features.offsets[f, :, 0] == CONTEXT.index("1742"))[0])
    start[f, 1:s] = -100.0  # only the answer's token is a likely start in the context
    start[f, 1] = end[f, 2] = 50.0  # question tokens
    end[f, s - 1] = 40.0  # ends before the best start
    assert decode([example], features, start, end)[0] == {"q-built": "1742"}
    # Only question tokens in the top 1: no valid span, and the reference answers "empty" with score 0.
    assert decode([example], features, start, end, n_best_size=1)[0] == {"q-built": "empty"}


def test_v2_null_score_threshold_and_minimum_over_windows(tok) -> None:
    example = _example("q-market", "On which days does the market open?", "Saturdays")
    features = make_features([example], tok, max_length=48, doc_stride=8, max_query_length=16)
    start, end, _ = _logits(features, example, "Saturdays")
    rows = np.flatnonzero(features.example_index == 0)
    start[rows, 0], end[rows, 0] = 6.0, 6.0
    start[rows[0], 0] = 2.0  # null score = min over windows = 2 + 6
    predictions, null_odds = decode([example], features, start, end, version="2.0")
    assert null_odds["q-market"] == pytest.approx(8.0 - 9.0)
    assert predictions["q-market"] == "Saturdays"  # odds -1 <= threshold 0
    assert decode([example], features, start, end, version="2.0", threshold=-2.0)[0]["q-market"] == ""
    assert decode([example], features, start, end, version="1.1", threshold=-2.0)[0]["q-market"] == "Saturdays"
    kept, _ = decode([example], features, start, end, version="2.0", threshold=None)
    assert apply_null_threshold(kept, null_odds, -2.0) == {"q-market": ""}


def test_decode_checks_shapes(tok) -> None:
    examples = _examples()
    features = make_features(examples, tok, max_length=48, doc_stride=8, max_query_length=16)
    with pytest.raises(ValueError, match="do not fit"):
        decode(examples, features, np.zeros((1, 48)), np.zeros((1, 48)))
    with pytest.raises(ValueError, match="has no features"):
        decode(examples + [_example("x", "Q?", "1742")], features, np.zeros((len(features), 48)),
               np.zeros((len(features), 48)))


# ----------------------------------------------------------------------------------------------------------------
# Writing, and the module's dependencies
# ----------------------------------------------------------------------------------------------------------------
def test_write_predictions(tmp_path: Path) -> None:
    paths = write_predictions(tmp_path / "out", {"a": "Zürich", "b": ""}, {"a": -1.5, "b": 2.0})
    assert [p.name for p in paths] == ["predictions.json", "null_odds.json"]
    assert json.loads(paths[0].read_text(encoding="utf-8")) == {"a": "Zürich", "b": ""}
    assert json.loads(paths[1].read_text(encoding="utf-8")) == {"a": -1.5, "b": 2.0}
    assert [p.name for p in write_predictions(tmp_path / "v1", {"a": "x"})] == ["predictions.json"]


def test_module_needs_only_numpy_and_tokenizers() -> None:
    from bertscale.finetune import squad

    tree = ast.parse(Path(squad.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    third_party = {name.split(".")[0] for name in imported} - {
        "__future__", "collections", "json", "logging", "re", "string", "dataclasses", "pathlib", "typing"}
    assert third_party == {"numpy", "tokenizers", "bertscale"}
    assert {name for name in imported if name.startswith("bertscale")} == {"bertscale.errors"}


# ----------------------------------------------------------------------------------------------------------------
# Real files
# ----------------------------------------------------------------------------------------------------------------
def _real(name: str) -> Path:
    path = TASK_DATA / "qa" / name
    if not path.is_file():
        pytest.skip(f"{path} not found; run scripts/fetch_task_data.sh and set BERTSCALE_TASK_DATA")
    return path


@pytest.mark.parametrize(("name", "count"), [("squad-v1.1-sample.json", 5), ("quoref-sample.json", 4)])
def test_real_files(tok, name: str, count: int) -> None:
    squad = load_squad(_real(name))
    assert squad.version == "1.1" and len(squad) == count and squad.skipped == {}
    features = make_features(squad, tok, max_length=64, doc_stride=16, max_query_length=24, train=True)
    for f in np.flatnonzero(features.start_positions > 0):
        example = squad[int(features.example_index[f])]
        text, start = example.answers[0]
        s, e = int(features.start_positions[f]), int(features.end_positions[f])
        span = features.offsets[f]
        # The tokens cover the answer and no more than the tokens at its edges.
        assert span[s, 0] <= start < span[s, 1] and span[e, 0] < start + len(text) <= span[e, 1]
    assert (features.start_positions > 0).any()
    gold = {e.id: e.answers[0][0] for e in squad}
    assert squad_evaluate(squad, gold) == {"exact": 100.0, "f1": 100.0, "total": count}
