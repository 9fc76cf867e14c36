"""Extractive question answering on SQuAD v1.1 and v2.0: loading, windowed features, span decoding, official metrics.

Pure functions on plain data (numpy and a `tokenizers.Tokenizer`), no torch:

- `load_squad` reads the official JSON (data -> paragraphs -> qas). The version is 2.0 when questions carry
  `is_impossible` (or the file says `"version": "v2.0"`), else 1.1. Malformed records are errors naming the file and
  the question. An answer whose `answer_start` does not point at its text is kept, because the official evaluation
  scripts score answer texts only, and is counted in `SquadSet.skipped`: the reference training pipelines (Google's
  BERT `run_squad.py`, the slow-tokenizer SQuAD processor of transformers) leave such questions out of training,
  and so does `make_features(train=True)`.
- `make_features` pairs each question with its context and splits contexts that do not fit into windows that
  overlap by `doc_stride` tokens (the fast tokenizer's `stride`, as transformers' `run_qa.py` uses it), keeping the
  character offsets of context tokens so that spans map back to the context text.
- `decode` is the n-best span search of the reference post-processing: top-n start x top-n end logits per window,
  end >= start, at most `max_answer_length` tokens, context tokens only; the null score is the smallest [CLS]
  start+end score over an example's windows, and the null odds are null score minus the best span's score.
- `squad_evaluate` computes exactly what the official `evaluate-v1.1.py` / `evaluate-v2.0.py` compute: scores are
  percentages, as the official scripts and leaderboards report them.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Encoding, Tokenizer

from bertscale.errors import ConfigError, InputError

log = logging.getLogger(__name__)

Version = Literal["1.1", "2.0"]

# Google's BERT splits contexts into words on these characters when it checks answer alignment.
_WORD = re.compile("[^ \t\r\n\u202f]+")
UNALIGNED = "answer_start_mismatch"


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SquadExample:
    """One question on one context; `answers` are (text, character start) pairs, empty for unanswerable ones."""

    id: str
    title: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool = False


@dataclass
class SquadSet:
    """The questions of one SQuAD file, its detected version, and per reason the questions training leaves out."""

    path: Path
    version: Version
    examples: list[SquadExample]
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[SquadExample]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> SquadExample:
        return self.examples[i]


def load_squad(path: str | Path) -> SquadSet:
    """Read a SQuAD v1.1 or v2.0 JSON file; InputError naming the file and question for malformed records."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"SQuAD file not found: {p}")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{p} is not valid UTF-8 JSON ({e}); expected a SQuAD file") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise InputError(f"{p} has no 'data' list; a SQuAD file is {{\"data\": [{{\"paragraphs\": [...]}}]}}")
    version: Version = "2.0" if str(raw.get("version", "")).lstrip("v").startswith("2") else "1.1"
    examples: list[SquadExample] = []
    seen: set[str] = set()
    for a, article in enumerate(raw["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise InputError(f"{p}: data[{a}] has no 'paragraphs' list")
        title = article.get("title", "")
        for i, paragraph in enumerate(paragraphs):
            for example in _paragraph_examples(paragraph, str(title), p, f"data[{a}].paragraphs[{i}]"):
                if example.id in seen:
                    raise InputError(f"{p}: question id {example.id!r} occurs twice; ids key the predictions")
                seen.add(example.id)
                examples.append(example)
            if any(isinstance(q, dict) and "is_impossible" in q for q in paragraph.get("qas", [])):
                version = "2.0"
    if not examples:
        raise InputError(f"{p} holds no questions")
    unaligned = [e.id for e in examples if e.answers and not e.is_impossible and not answer_aligned(e)]
    result = SquadSet(p, version, examples)
    if unaligned:
        result.skipped[UNALIGNED] = len(unaligned)
        result.skipped_ids[UNALIGNED] = unaligned
        log.warning("%s: %d question(s) whose answer text is not at its answer_start (%s%s): kept for evaluation, "
                    "which scores answer texts only; left out of training, as the reference implementations do",
                    p, len(unaligned), ", ".join(unaligned[:5]), ", ..." if len(unaligned) > 5 else "")
    return result


def _paragraph_examples(paragraph: Any, title: str, path: Path, where: str) -> Iterator[SquadExample]:
    if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
        raise InputError(f"{path}: {where} has no 'qas' list")
    context = paragraph.get("context")
    for k, qa in enumerate(paragraph["qas"]):
        qid = qa.get("id") if isinstance(qa, dict) else None
        if not isinstance(qid, str) or not qid:
            raise InputError(f"{path}: {where}.qas[{k}] has no string 'id'")
        record = f"{path}: question {qid!r}"
        if not isinstance(context, str) or not context.strip():
            raise InputError(f"{record} has no context: its paragraph's 'context' is missing or empty")
        question = qa.get("question")
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{record} has no 'question' text")
        impossible = qa.get("is_impossible", False)
        if not isinstance(impossible, bool):
            raise InputError(f"{record}: 'is_impossible' must be true or false, not {impossible!r}")
        yield SquadExample(qid, title, question, context, _answers(qa, record), impossible)


def _answers(qa: dict, record: str) -> tuple[tuple[str, int], ...]:
    answers = qa.get("answers")
    if not isinstance(answers, list):
        raise InputError(f"{record} has no 'answers' list (use [] for an unanswerable or unlabelled question)")
    out = []
    for j, answer in enumerate(answers):
        text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{record}: answers[{j}] has no 'text'")
        if not isinstance(start, int) or isinstance(start, bool):
            raise InputError(f"{record}: answers[{j}] has no integer 'answer_start' (got {start!r})")
        out.append((text, start))
    return tuple(out)


def answer_aligned(example: SquadExample) -> bool:
    """Whether the first answer's text is where `answer_start` says, by the reference's own check.

    The character span must hold the text, or (Google's BERT `read_squad_examples`) the whitespace-separated words
    that the span touches must contain the answer with its whitespace collapsed.
    """
    text, start = example.answers[0]
    context = example.context
    end = start + len(text)
    if start < 0 or not text or end > len(context):
        return False
    if context[start:end] == text:
        return True
    words = list(_WORD.finditer(context))
    starts = [w.start() for w in words]
    first = int(np.searchsorted(starts, start, side="right")) - 1
    last = int(np.searchsorted(starts, end - 1, side="right")) - 1
    actual = " ".join(w.group() for w in words[max(first, 0):last + 1])
    return " ".join(_WORD.findall(text)) in actual


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Model inputs of every window, padded to max_length, and what maps them back to examples and characters.

    `offsets[f, t]` is the (start, end) character span of token t in its example's context, (-1, -1) for question,
    special and padding tokens. `start_positions`/`end_positions` (training only) are token indices of the answer,
    0 ([CLS]) where the question is unanswerable or the answer is not wholly inside the window.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    offsets: np.ndarray
    example_index: np.ndarray
    start_positions: np.ndarray | None = None
    end_positions: np.ndarray | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.example_index)


def make_features(
    examples: Sequence[SquadExample],
    tokenizer: Tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    train: bool = False,
) -> Features:
    """Tokenize question + context pairs into windows of `max_length` tokens overlapping by `doc_stride` tokens.

    Questions longer than `max_query_length` tokens are cut, as Google's BERT does. With `train`, questions whose
    answer is not at its `answer_start` are left out (counted in `skipped`), and answer token positions are set.
    """
    _check_lengths(max_length, doc_stride, max_query_length)
    tok = Tokenizer.from_str(tokenizer.to_str())  # truncation settings must not leak into the caller's tokenizer
    tok.no_padding()
    tok.no_truncation()
    pad_id = tok.token_to_id("[PAD]")
    if pad_id is None:
        raise InputError("the tokenizer has no [PAD] token; a BERT tokenizer needs one")
    kept, skipped = list(range(len(examples))), {}
    if train:
        unaligned = [i for i in kept if _answerable(examples[i]) and not answer_aligned(examples[i])]
        if unaligned:
            skipped[UNALIGNED] = len(unaligned)
            log.warning("left %d question(s) out of training whose answer is not at its answer_start: %s",
                        len(unaligned), ", ".join(examples[i].id for i in unaligned[:5]))
            kept = sorted(set(kept) - set(unaligned))
    questions = _cut_questions([examples[i].question.lstrip() for i in kept], tok, max_query_length)
    tok.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
    encodings = tok.encode_batch([(q, examples[i].context) for q, i in zip(questions, kept, strict=True)])
    windows = [(i, w) for i, enc in zip(kept, encodings, strict=True) for w in [enc, *enc.overflowing]]
    features = _pack([w for _, w in windows], max_length, pad_id)
    features.example_index = np.array([i for i, _ in windows], dtype=np.int64)
    features.skipped = skipped
    if train:
        positions = [_answer_positions(examples[i], features.offsets[f]) for f, (i, _) in enumerate(windows)]
        features.start_positions = np.array([s for s, _ in positions], dtype=np.int64).reshape(len(windows))
        features.end_positions = np.array([e for _, e in positions], dtype=np.int64).reshape(len(windows))
    return features


def _pack(windows: list[Encoding], max_length: int, pad_id: int) -> Features:
    """Windows padded into arrays, with character offsets kept for context tokens only."""
    n = len(windows)
    ids = np.full((n, max_length), pad_id, dtype=np.int64)
    types = np.zeros((n, max_length), dtype=np.int64)
    mask = np.zeros((n, max_length), dtype=np.int64)
    offsets = np.full((n, max_length, 2), -1, dtype=np.int32)
    for f, w in enumerate(windows):
        if w.sequence_ids[0] is not None:
            raise InputError("the tokenizer adds no [CLS] token in front of a pair; load a BERT tokenizer whose "
                             "post-processor writes [CLS] A [SEP] B [SEP]")
        length = len(w.ids)
        ids[f, :length], types[f, :length], mask[f, :length] = w.ids, w.type_ids, 1
        context_tokens = np.array([s == 1 for s in w.sequence_ids])
        offsets[f, :length][context_tokens] = np.array(w.offsets, dtype=np.int32)[context_tokens]
    return Features(ids, types, mask, offsets, np.zeros(n, dtype=np.int64))


def _check_lengths(max_length: int, doc_stride: int, max_query_length: int) -> None:
    if max_query_length < 1 or doc_stride < 0:
        raise ConfigError(f"max_query_length ({max_query_length}) must be >= 1 and doc_stride ({doc_stride}) >= 0")
    room = max_length - max_query_length - 3  # [CLS] question [SEP] context [SEP]
    if room < 1:
        raise ConfigError(f"max_length ({max_length}) leaves no room for context after a {max_query_length}-token "
                          "question and 3 special tokens: raise max_length or lower max_query_length")
    if doc_stride >= room:
        raise ConfigError(f"doc_stride ({doc_stride}) must be smaller than the {room} context tokens a window holds "
                          f"(max_length {max_length} - max_query_length {max_query_length} - 3); windows overlap "
                          "by doc_stride tokens")


def _cut_questions(questions: list[str], tok: Tokenizer, max_query_length: int) -> list[str]:
    """Questions cut after their first `max_query_length` tokens, at the character where that token ends."""
    out = []
    for q, enc in zip(questions, tok.encode_batch(questions, add_special_tokens=False), strict=True):
        out.append(q[: enc.offsets[max_query_length - 1][1]] if len(enc.ids) > max_query_length else q)
    return out


def _answerable(example: SquadExample) -> bool:
    return bool(example.answers) and not example.is_impossible


def _answer_positions(example: SquadExample, offsets: np.ndarray) -> tuple[int, int]:
    """Token indices of the first answer in one window, (0, 0) when unanswerable or not wholly inside it."""
    if not _answerable(example):
        return 0, 0
    text, start_char = example.answers[0]
    end_char = start_char + len(text)
    context = np.flatnonzero(offsets[:, 0] >= 0)
    if not len(context):
        return 0, 0
    starts, ends = offsets[context, 0], offsets[context, 1]
    if starts[0] > start_char or ends[-1] < end_char:
        return 0, 0
    first = int(np.searchsorted(starts, start_char, side="right")) - 1  # last token starting at or before it
    last = int(np.searchsorted(ends, end_char, side="left"))  # first token ending at or after it
    return int(context[first]), int(context[last])


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------
def decode(
    examples: Sequence[SquadExample],
    features: Features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    threshold: float | None = 0.0,
    version: Version | None = None,
) -> tuple[dict[str, str], dict[str, float]]:
    """Best answer text and null odds (null score - best span score) per question id.

    For SQuAD 2.0 the answer is "" where the null odds exceed `threshold`; `threshold=None` keeps the best span
    everywhere (then `apply_null_threshold` can try thresholds without decoding again). As in the reference
    post-processing, a question with no valid span gets the text "empty" with score 0.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    n, width = len(features), features.offsets.shape[1]
    if start_logits.shape != end_logits.shape or start_logits.ndim != 2 or len(start_logits) != n \
            or start_logits.shape[1] > width:
        raise ValueError(f"logits of shape {start_logits.shape} and {end_logits.shape} do not fit {n} features "
                         f"of {width} tokens")
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for f, i in enumerate(features.example_index.tolist()):
        by_example[i].append(f)
    negative = _version(examples, version) == "2.0"
    predictions: dict[str, str] = {}
    null_odds: dict[str, float] = {}
    for i, example in enumerate(examples):
        if i not in by_example:
            raise ValueError(f"question {example.id!r} has no features: decode the features made from these examples")
        text, score, null = _best_span(example.context, by_example[i], features.offsets, start_logits, end_logits,
                                       n_best_size, max_answer_length)
        null_odds[example.id] = float(null - score)
        predictions[example.id] = text
    if negative and threshold is not None:
        predictions = apply_null_threshold(predictions, null_odds, threshold)
    return predictions, null_odds


def _best_span(context: str, feature_ids: list[int], offsets: np.ndarray, start_logits: np.ndarray,
               end_logits: np.ndarray, n_best_size: int, max_answer_length: int) -> tuple[str, float, float]:
    """(text, score) of the best span over an example's windows, and its null score."""
    null = None
    candidates: list[tuple[float, int, int]] = []
    for f in feature_ids:
        s, e, off = start_logits[f], end_logits[f], offsets[f]
        feature_null = float(s[0] + e[0])
        if null is None or feature_null < null:
            null = feature_null
        # The same top-n selection as the reference, so ties break the same way.
        top_ends = np.argsort(e)[-1: -n_best_size - 1: -1].tolist()
        for i in np.argsort(s)[-1: -n_best_size - 1: -1].tolist():
            if off[i, 0] < 0:
                continue
            for j in top_ends:
                if off[j, 0] < 0 or j < i or j - i + 1 > max_answer_length:
                    continue
                candidates.append((float(s[i] + e[j]), int(off[i, 0]), int(off[j, 1])))
    assert null is not None
    if not candidates:
        return "empty", 0.0, null
    score, start, end = max(candidates, key=lambda c: c[0])  # first of equal scores, as a stable sort keeps
    return context[start:end], score, null


def apply_null_threshold(predictions: Mapping[str, str], null_odds: Mapping[str, float],
                         threshold: float) -> dict[str, str]:
    """Predictions with "" (no answer) where the null odds exceed `threshold`."""
    return {qid: "" if null_odds[qid] > threshold else text for qid, text in predictions.items()}


def _version(examples: Sequence[SquadExample], version: Version | None) -> Version:
    if version is not None:
        if version not in ("1.1", "2.0"):
            raise ValueError(f"unknown SQuAD version {version!r}; use '1.1' or '2.0'")
        return version
    if isinstance(examples, SquadSet):
        return examples.version
    return "2.0" if any(e.is_impossible or not e.answers for e in examples) else "1.1"


# ----------------------------------------------------------------------------------------------------------------
# The official evaluation
# ----------------------------------------------------------------------------------------------------------------
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the official scripts' normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(gold: str, pred: str, both_empty: float) -> float:
    gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not gold_toks or not pred_toks:
        return both_empty if gold_toks == pred_toks else 0.0
    same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def exact_score(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    """v2.0's token F1: 1 when both are empty after normalisation (v1.1 gives 0 there)."""
    return _f1(gold, pred, both_empty=1.0)


def squad_evaluate(
    examples: Sequence[SquadExample],
    predictions: Mapping[str, str],
    null_odds: Mapping[str, float] | None = None,
    threshold: float | None = None,
    version: Version | None = None,
) -> dict[str, float]:
    """The official SQuAD metrics, in percent, with the official scripts' keys except v1.1's `exact_match`: `exact`.

    v1.1: `exact`, `f1`, `total` (questions without a prediction score 0). v2.0: `exact`, `f1`, `total` over the
    questions that have a prediction, `HasAns_*` and `NoAns_*` splits, and with `null_odds` (the official
    na-prob file) `best_exact`, `best_exact_thresh`, `best_f1`, `best_f1_thresh`. `threshold` is the official
    `--na-prob-thresh`: questions whose null odds exceed it count as answered "no answer"; None leaves the
    predictions as they are.
    """
    if not len(examples):
        raise InputError("no questions to evaluate")
    if _version(examples, version) == "1.1":
        if null_odds is not None or threshold is not None:
            raise ValueError("null odds and thresholds apply to SQuAD 2.0 only")
        return _evaluate_v1(examples, predictions)
    return _evaluate_v2(examples, predictions, null_odds, threshold)


def _evaluate_v1(examples: Sequence[SquadExample], predictions: Mapping[str, str]) -> dict[str, float]:
    exact = f1 = 0.0
    missing = []
    for ex in examples:
        if not ex.answers:
            raise InputError(f"question {ex.id!r} has no gold answer; SQuAD v1.1 questions all have answers "
                             "(evaluate a file with unanswerable questions as SQuAD 2.0)")
        if ex.id not in predictions:
            missing.append(ex.id)
            continue
        golds, pred = [text for text, _ in ex.answers], predictions[ex.id]
        exact += max(exact_score(g, pred) for g in golds)
        f1 += max(_f1(g, pred, both_empty=0.0) for g in golds)
    _warn_missing(missing, "score 0")
    total = len(examples)
    return {"exact": 100.0 * exact / total, "f1": 100.0 * f1 / total, "total": total}


def _evaluate_v2(examples: Sequence[SquadExample], predictions: Mapping[str, str],
                 null_odds: Mapping[str, float] | None, threshold: float | None) -> dict[str, float]:
    has_ans = {ex.id: bool(ex.answers) for ex in examples}
    exact_raw, f1_raw, missing = {}, {}, []
    for ex in examples:
        if ex.id not in predictions:
            missing.append(ex.id)
            continue
        golds = [text for text, _ in ex.answers if normalize_answer(text)] or [""]
        pred = predictions[ex.id]
        exact_raw[ex.id] = max(exact_score(g, pred) for g in golds)
        f1_raw[ex.id] = max(f1_score(g, pred) for g in golds)
    _warn_missing(missing, "are left out of the scores")
    if not exact_raw:
        raise InputError("no question has a prediction; nothing to score")
    if null_odds is not None:
        absent = [qid for qid in exact_raw if qid not in null_odds]
        if absent:
            raise InputError(f"null odds lack {len(absent)} predicted question(s), e.g. {absent[0]!r}")
    exact, f1 = exact_raw, f1_raw
    if threshold is not None and null_odds is not None:
        exact = _apply_no_answer(exact_raw, null_odds, has_ans, threshold)
        f1 = _apply_no_answer(f1_raw, null_odds, has_ans, threshold)
    out = _eval_dict(exact, f1, list(exact))
    for prefix, qids in (("HasAns", [q for q, v in has_ans.items() if v]),
                         ("NoAns", [q for q, v in has_ans.items() if not v])):
        if qids:
            out.update({f"{prefix}_{k}": v for k, v in _eval_dict(exact, f1, qids).items()})
    if null_odds is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(predictions, exact_raw, null_odds, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, null_odds, has_ans)
    return out


def _warn_missing(missing: list[str], what: str) -> None:
    if missing:
        log.warning("%d question(s) have no prediction and %s, as in the official script: %s%s", len(missing), what,
                    ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")


def _apply_no_answer(scores: dict[str, float], null_odds: Mapping[str, float], has_ans: dict[str, bool],
                     threshold: float) -> dict[str, float]:
    return {q: float(not has_ans[q]) if null_odds[q] > threshold else s for q, s in scores.items()}


def _eval_dict(exact: dict[str, float], f1: dict[str, float], qids: list[str]) -> dict[str, float]:
    # The official script indexes every listed question; a question without a prediction there is a KeyError.
    present = [q for q in qids if q in exact]
    total = len(present)
    if total == 0:
        return {"exact": 0.0, "f1": 0.0, "total": 0}
    return {"exact": 100.0 * sum(exact[q] for q in present) / total,
            "f1": 100.0 * sum(f1[q] for q in present) / total, "total": total}


def _best_threshold(predictions: Mapping[str, str], scores: dict[str, float], null_odds: Mapping[str, float],
                    has_ans: dict[str, bool]) -> tuple[float, float]:
    """The official find_best_thresh: answer questions in order of rising null odds, keep the best cut-off."""
    cur = best = float(sum(1 for v in has_ans.values() if not v))
    best_thresh = 0.0
    for qid in sorted(null_odds, key=lambda k: null_odds[k]):
        if qid not in scores:
            continue
        diff = scores[qid] if has_ans[qid] else (-1.0 if predictions[qid] else 0.0)
        cur += diff
        if cur > best:
            best, best_thresh = cur, null_odds[qid]
    return 100.0 * best / len(scores), float(best_thresh)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def write_predictions(out_dir: str | Path, predictions: Mapping[str, str],
                      null_odds: Mapping[str, float] | None = None) -> list[Path]:
    """The official `predictions.json` ({id: answer text}) and, given null odds, `null_odds.json` ({id: odds})."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [(out / "predictions.json", dict(predictions))]
    if null_odds is not None:
        files.append((out / "null_odds.json", {k: float(v) for k, v in null_odds.items()}))
    for path, data in files:
        path.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return [path for path, _ in files]
