"""Entity tags and their scores, as pure functions on lists of tag strings.

Tags are `O` or `<prefix>-<type>`: IOB1 and IOB2 use the prefixes I and B, BIOES adds E (end) and S (single).
Entities are read from tags exactly as `seqeval`'s default mode reads them (`get_entities`, the conlleval-
compatible decoding that serves all three schemes): a chunk ends where the prefix or the type says so, an `I-`
after `O` or after another type starts one, and sentences never share an entity. A predicted entity counts when
its span and type both equal a gold entity's. Precision, recall and F1 are micro-averaged over all entities and
given per type, with seqeval's zero-division rule (0 when undefined); token accuracy counts equal tags.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["iob1", "iob2", "bioes"]
SCHEME_PREFIXES: dict[str, tuple[str, ...]] = {"iob1": ("I", "B"), "iob2": ("B", "I"), "bioes": ("B", "I", "E", "S")}
OUTSIDE = "O"

Entity = tuple[str, int, int]  # (type, first token, last token), token offsets counted over the whole split


def check_tag(tag: str, scheme: str) -> str | None:
    """None when `tag` is valid in `scheme`, else what is wrong with it, in words."""
    if tag == OUTSIDE:
        return None
    prefix, dash, kind = tag.partition("-")
    allowed = SCHEME_PREFIXES[scheme]
    if not dash or not kind or prefix not in allowed:
        return (f"tag {tag!r} is not {OUTSIDE!r} or {'/'.join(p + '-TYPE' for p in allowed)} "
                f"({scheme.upper()} tags)")
    return None


def _split(tag: str) -> tuple[str, str]:
    """(prefix, type) as seqeval's default mode splits a tag: the first character, and what follows the dash."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != kind


def _starts(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != kind


def get_entities(sentences: Sequence[Sequence[str]]) -> list[Entity]:
    """Every entity of the sentences, as seqeval's `get_entities` returns them for a list of sentences: offsets
    over the sentences joined with one `O` between them (so no entity crosses a sentence boundary)."""
    flat: list[str] = []
    for sentence in sentences:
        flat += list(sentence) + [OUTSIDE]
    chunks: list[Entity] = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate(flat + [OUTSIDE]):
        tag, kind = _split(chunk)
        if _ends(prev_tag, tag, prev_type, kind):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, kind):
            begin = i
        prev_tag, prev_type = tag, kind
    return chunks


def sentence_entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of one sentence, with offsets into it."""
    return get_entities([tags])


@dataclass(frozen=True)
class Counts:
    """Entity counts of one type (or of all): predicted, gold, and both (exact span and type)."""

    predicted: int = 0
    gold: int = 0
    correct: int = 0

    def scores(self) -> dict[str, float]:
        """Precision, recall and F1 as seqeval computes them: 0 where a denominator is 0, F1 = 2PR / (P + R)."""
        p = self.correct / self.predicted if self.predicted else 0.0
        r = self.correct / self.gold if self.gold else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": p, "recall": r, "f1": f}


def entity_counts(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Counts]:
    """Counts per entity type (sorted by type name, as seqeval's report lists them)."""
    if len(gold) != len(predicted) or any(len(g) != len(p) for g, p in zip(gold, predicted)):
        raise ValueError("gold and predicted tags differ in shape: one tag per token, one list per sentence")
    by_type_gold: dict[str, set[tuple[int, int]]] = defaultdict(set)
    by_type_pred: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for kind, start, end in get_entities(gold):
        by_type_gold[kind].add((start, end))
    for kind, start, end in get_entities(predicted):
        by_type_pred[kind].add((start, end))
    return {kind: Counts(len(by_type_pred[kind]), len(by_type_gold[kind]),
                         len(by_type_gold[kind] & by_type_pred[kind]))
            for kind in sorted(set(by_type_gold) | set(by_type_pred))}


def token_accuracy(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """The fraction of tokens whose predicted tag equals the gold one (seqeval's accuracy_score)."""
    pairs = [(g, p) for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps)]
    return sum(g == p for g, p in pairs) / len(pairs) if pairs else 0.0


def ner_metrics(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> tuple[dict[str, float],
                                                                                             dict[str, int]]:
    """(metrics, supports): micro precision/recall/F1 over all entities, token accuracy and `score` (= F1, what
    best-epoch selection and the registry compare), then `<TYPE>.precision/recall/f1` per entity type; and the
    number of gold entities per type."""
    counts = entity_counts(gold, predicted)
    total = Counts(sum(c.predicted for c in counts.values()), sum(c.gold for c in counts.values()),
                   sum(c.correct for c in counts.values()))
    metrics = {**total.scores(), "accuracy": token_accuracy(gold, predicted)}
    metrics["score"] = metrics["f1"]
    for kind, c in counts.items():
        metrics.update({f"{kind}.{name}": value for name, value in c.scores().items()})
    return metrics, {kind: c.gold for kind, c in counts.items()}
