"""Pretraining instances from tokenized documents: Devlin et al. NSP pairs, or packed full sentences.

Pure functions on flat numpy arrays. A corpus is held as `TokenizedDocs`: one flat token array, sentence
offsets into it and document offsets into the sentences, so that 16M tokens cost 64 MB and not a Python
object per token. Sentences of a document are contiguous in the flat array, which makes every NSP segment and
every packed sequence a contiguous span `[start, end)`: an instance is a handful of integers, and the token
arrays are only materialised when the shards are written.

The NSP algorithm follows google-research/bert `create_pretraining_data.py` (`create_instances_from_document`,
`truncate_seq_pair`) with two deliberate differences, both noted where they happen: the random B document is
drawn among the *other* documents (the reference retries 10 times and may fall back to the same document;
the data stage draws among a corpus-wide sample, see `nsp_pool.py`), and
the short target length is redrawn for every instance (the reference draws it once per document).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NSP_IGNORE = -100  # NSP label of packed sequences: the loss ignores it (matches the batch contract)
_FIELDS = ("a_start", "a_end", "b_start", "b_end", "nsp_label", "doc_a", "doc_b")  # the arrays of `Instances`


@dataclass
class TokenizedDocs:
    """Sentences of many documents as flat arrays."""

    tokens: np.ndarray  # [N] token ids, all sentences of all documents back to back
    sent_offsets: np.ndarray  # [S+1] int64: sentence s is tokens[sent_offsets[s]:sent_offsets[s+1]]
    doc_offsets: np.ndarray  # [D+1] int64: document d is sentences doc_offsets[d]:doc_offsets[d+1]

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sent_offsets) - 1

    @classmethod
    def from_lists(cls, docs: list[list[list[int]]]) -> "TokenizedDocs":
        """Build from nested Python lists (tests and small inputs); empty sentences are kept as they are."""
        sent_lengths = [len(s) for d in docs for s in d]
        tokens = np.fromiter((t for d in docs for s in d for t in s), dtype=np.int64, count=sum(sent_lengths))
        sent_offsets = np.concatenate([[0], np.cumsum(sent_lengths, dtype=np.int64)])
        doc_offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)])
        return cls(tokens, sent_offsets.astype(np.int64), doc_offsets.astype(np.int64))

    def select(self, doc_ids: np.ndarray) -> "TokenizedDocs":
        """The given documents, in the given order, as a new (copied) TokenizedDocs."""
        return select_sentences(self, self.doc_offsets[doc_ids], self.doc_offsets[doc_ids + 1])


def select_sentences(docs: TokenizedDocs, sent_lo: np.ndarray, sent_hi: np.ndarray) -> TokenizedDocs:
    """New documents made of the sentence ranges [sent_lo[i], sent_hi[i]) of `docs` (copied)."""
    sent_idx = ranges(sent_lo, sent_hi)
    tok_idx = ranges(docs.sent_offsets[sent_idx], docs.sent_offsets[sent_idx + 1])
    sent_len = docs.sent_offsets[sent_idx + 1] - docs.sent_offsets[sent_idx]
    return TokenizedDocs(
        tokens=docs.tokens[tok_idx],
        sent_offsets=np.concatenate([[0], np.cumsum(sent_len)]).astype(np.int64),
        doc_offsets=np.concatenate([[0], np.cumsum(sent_hi - sent_lo)]).astype(np.int64),
    )


def concat_docs(parts: list[TokenizedDocs]) -> TokenizedDocs:
    """Documents of several TokenizedDocs back to back (the data stage appends the B pool to a shard's docs)."""
    tok_base = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]], dtype=np.int64)
    sent_base = np.cumsum([0] + [p.num_sentences for p in parts[:-1]], dtype=np.int64)
    return TokenizedDocs(
        tokens=np.concatenate([p.tokens for p in parts]),
        sent_offsets=np.concatenate([[0]] + [p.sent_offsets[1:] + b for p, b in zip(parts, tok_base)]).astype(np.int64),
        doc_offsets=np.concatenate([[0]] + [p.doc_offsets[1:] + b for p, b in zip(parts, sent_base)]).astype(np.int64),
    )


def ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of arange(lo[i], hi[i]) for every i, without a Python loop."""
    lengths = (hi - lo).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo.astype(np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(total, dtype=np.int64)


def split_long_sentences(docs: TokenizedDocs, max_len: int) -> tuple[TokenizedDocs, int]:
    """Cut sentences longer than `max_len` tokens into consecutive pieces of at most `max_len`.

    Without this a run-on "sentence" (a table, a list, a document with no sentence punctuation) would be
    truncated to one instance and the rest thrown away. Returns the new docs and how many sentences were cut.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    lengths = np.diff(docs.sent_offsets)
    pieces = np.maximum(1, -(-lengths // max_len))
    n_cut = int((pieces > 1).sum())
    if n_cut == 0:
        return docs, 0
    first_piece = np.concatenate([[0], np.cumsum(pieces)])
    piece_rank = np.arange(int(pieces.sum()), dtype=np.int64) - np.repeat(first_piece[:-1], pieces)
    starts = np.repeat(docs.sent_offsets[:-1], pieces) + piece_rank * max_len
    sent_offsets = np.append(starts, docs.sent_offsets[-1]).astype(np.int64)
    return TokenizedDocs(docs.tokens, sent_offsets, first_piece[docs.doc_offsets].astype(np.int64)), n_cut


def truncation_amounts(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """How many tokens `truncate_seq_pair` removes from A and from B, in closed form.

    The reference pops one token at a time from the longer segment (A on a tie) until the pair fits: the longer
    one shrinks to the shorter one's length, then they shrink alternately, A first.
    """
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return 0, 0
    gap = abs(len_a - len_b)
    if excess <= gap:
        return (excess, 0) if len_a >= len_b else (0, excess)
    rest = excess - gap
    cut_a, cut_b = (rest + 1) // 2, rest // 2
    return (gap + cut_a, cut_b) if len_a >= len_b else (cut_a, gap + cut_b)


def truncate_pair(
    a: tuple[int, int], b: tuple[int, int], max_tokens: int, rng: np.random.Generator
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Truncate spans A and B to fit `max_tokens` together, each removed token from the front or back at random.

    Same distribution as the reference's one-pop-at-a-time loop: each pop picks the front with probability 1/2,
    so the number taken from the front of a segment is Binomial(pops, 1/2).
    """
    cut_a, cut_b = truncation_amounts(a[1] - a[0], b[1] - b[0], max_tokens)
    front_a = int(rng.binomial(cut_a, 0.5)) if cut_a else 0
    front_b = int(rng.binomial(cut_b, 0.5)) if cut_b else 0
    return (a[0] + front_a, a[1] - (cut_a - front_a)), (b[0] + front_b, b[1] - (cut_b - front_b))


@dataclass
class Instances:
    """Instances as spans into a TokenizedDocs' flat token array (the [CLS]/[SEP] are added when written).

    NSP mode: A = tokens[a_start:a_end], B = tokens[b_start:b_end]. Packed mode: the whole sequence is
    tokens[a_start:a_end] (b_start == b_end), with a [SEP] inserted at every document boundary inside it.
    """

    a_start: np.ndarray
    a_end: np.ndarray
    b_start: np.ndarray
    b_end: np.ndarray
    nsp_label: np.ndarray  # int8: 0 = B follows A, 1 = random B, NSP_IGNORE in packed mode
    doc_a: np.ndarray  # document of A (first document of a packed sequence)
    doc_b: np.ndarray  # document of B (-1 in packed mode)

    def __len__(self) -> int:
        return len(self.a_start)

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int, int, int, int, int, int]]) -> "Instances":
        arr = np.asarray(rows, dtype=np.int64).reshape(-1, len(_FIELDS))
        return cls(*(arr[:, i] for i in range(len(_FIELDS))))

    @classmethod
    def empty(cls) -> "Instances":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, z, z, z)

    @classmethod
    def concat(cls, parts: list["Instances"]) -> "Instances":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, n) for p in parts]) for n in _FIELDS))

    def take(self, order: np.ndarray) -> "Instances":
        return Instances(*(getattr(self, n)[order] for n in _FIELDS))


def _target_length(max_num_tokens: int, short_seq_prob: float, rng: np.random.Generator) -> int:
    # Mostly fill the sequence (padding is wasted compute), sometimes go shorter so that pretraining also sees
    # the short inputs of fine-tuning; the reference's randint(2, max) is inclusive.
    if short_seq_prob > 0 and rng.random() < short_seq_prob:
        return int(rng.integers(2, max_num_tokens + 1))
    return max_num_tokens


def _random_b(
    docs: TokenizedDocs, doc_index: int, target_b_length: int, rng: np.random.Generator,
    candidates: "BCandidates | None" = None,
) -> tuple[int, int, int]:
    """A span of whole sentences from a random *other* document, grown until it reaches `target_b_length`."""
    other = (candidates or BCandidates(0, docs.num_docs)).draw(doc_index, rng)
    s_lo, s_hi = int(docs.doc_offsets[other]), int(docs.doc_offsets[other + 1])
    start = s_lo + int(rng.integers(0, s_hi - s_lo))
    # First sentence whose end reaches start + target: the same stopping rule as the reference's loop.
    ends = docs.sent_offsets[start + 1 : s_hi + 1]
    stop = int(np.searchsorted(ends, docs.sent_offsets[start] + max(target_b_length, 1)))
    stop = min(stop, len(ends) - 1)
    return int(docs.sent_offsets[start]), int(ends[stop]), other


@dataclass(frozen=True)
class BCandidates:
    """Where a random B may come from: documents [lo, hi) of the TokenizedDocs, never A's own document.

    The data stage appends a sample of the whole corpus (the B pool) after a shard's own documents; `twin[d]`
    is then the pool position holding a copy of source document d (-1 if none), so B can never be A's document
    even when that document was also sampled into the pool.
    """

    lo: int
    hi: int
    twin: np.ndarray | None = None

    def draw(self, doc_index: int, rng: np.random.Generator) -> int:
        twin = int(self.twin[doc_index]) if self.twin is not None and doc_index < len(self.twin) else -1
        excluded = sorted({e for e in (doc_index, twin) if self.lo <= e < self.hi})
        n = self.hi - self.lo - len(excluded)
        if n < 1:
            raise ValueError("NSP instances need at least two documents (B must come from another document)")
        # Drawing among the allowed positions and stepping over the excluded ones: one draw, no retries.
        other = self.lo + int(rng.integers(0, n))
        for e in excluded:
            other += other >= e
        return other


class _NSPBalance:
    """Keeps the random-next ratio near 50%.

    The reference algorithm forces a random B whenever a chunk holds a single sentence, which on short documents
    (most Wikipedia articles, paragraph documents) pushes the ratio to ~60%. Chunks that have a choice lean
    towards "is next" while the random share is above half, so the label stays balanced overall.
    """

    def __init__(self) -> None:
        self.random = 0
        self.total = 0

    def choose_random(self, forced: bool, rng: np.random.Generator) -> bool:
        p = 0.5 if 2 * self.random <= self.total else 0.2
        is_random = forced or bool(rng.random() < p)
        self.random += is_random
        self.total += 1
        return is_random


def nsp_instances_from_document(
    docs: TokenizedDocs, doc_index: int, max_seq_length: int, short_seq_prob: float, rng: np.random.Generator,
    balance: _NSPBalance | None = None, candidates: BCandidates | None = None,
) -> list[tuple[int, int, int, int, int, int, int]]:
    """Devlin et al. sentence-pair instances of one document, as rows for `Instances.from_rows`."""
    balance = balance or _NSPBalance()
    if candidates is None and docs.num_docs < 2:
        raise ValueError("NSP instances need at least two documents (B must come from another document)")
    max_num_tokens = max_seq_length - 3  # [CLS] A [SEP] B [SEP]
    s_lo, s_hi = int(docs.doc_offsets[doc_index]), int(docs.doc_offsets[doc_index + 1])
    offs = docs.sent_offsets
    rows = []
    target = _target_length(max_num_tokens, short_seq_prob, rng)
    chunk_start, i = s_lo, s_lo
    while i < s_hi:
        if i == s_hi - 1 or offs[i + 1] - offs[chunk_start] >= target:
            n_chunk = i + 1 - chunk_start
            a_end_sent = chunk_start + (int(rng.integers(1, n_chunk)) if n_chunk >= 2 else 1)
            a = (int(offs[chunk_start]), int(offs[a_end_sent]))
            if balance.choose_random(n_chunk == 1, rng):
                b0, b1, doc_b = _random_b(docs, doc_index, target - (a[1] - a[0]), rng, candidates)
                label = 1
                i = a_end_sent - 1  # put the unused sentences back for the next instance
            else:
                b0, b1, doc_b, label = a[1], int(offs[i + 1]), doc_index, 0
            a, (b0, b1) = truncate_pair(a, (b0, b1), max_num_tokens, rng)
            rows.append((a[0], a[1], b0, b1, label, doc_index, doc_b))
            chunk_start = i + 1
            target = _target_length(max_num_tokens, short_seq_prob, rng)
        i += 1
    return rows


def create_nsp_instances(
    docs: TokenizedDocs, max_seq_length: int, short_seq_prob: float, dupe_factor: int, rng: np.random.Generator,
    num_sources: int | None = None, candidates: BCandidates | None = None,
) -> Instances:
    """NSP instances of the first `num_sources` documents (default all), `dupe_factor` passes with fresh random
    choices each time; random Bs come from `candidates` (default: every other document)."""
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be >= 5 for [CLS] A [SEP] B [SEP], got {max_seq_length}")
    rows: list[tuple[int, int, int, int, int, int, int]] = []
    balance = _NSPBalance()
    n_src = docs.num_docs if num_sources is None else num_sources
    for _ in range(dupe_factor):
        for d in range(n_src):
            rows.extend(nsp_instances_from_document(docs, d, max_seq_length, short_seq_prob, rng, balance,
                                                    candidates))
    return Instances.from_rows(rows)


def create_packed_instances(docs: TokenizedDocs, max_seq_length: int) -> Instances:
    """Whole sentences packed greedily across document boundaries: [CLS] s1 s2 .. [SEP] (doc2 ..) [SEP].

    Sentences longer than the room in one sequence must be cut first (`split_long_sentences` with
    `max_seq_length - 2`). A [SEP] marks each document boundary inside a sequence, so every boundary costs
    one token of room.
    """
    room = max_seq_length - 2  # [CLS] ... [SEP]
    lengths = np.diff(docs.sent_offsets)
    if len(lengths) and int(lengths.max()) > room:
        raise ValueError(f"a sentence has {int(lengths.max())} tokens > {room}: call split_long_sentences first")
    sent_doc = np.repeat(np.arange(docs.num_docs), np.diff(docs.doc_offsets))
    rows = []
    start_sent, used = 0, 0
    for s in range(docs.num_sentences):
        extra = 1 if s > start_sent and sent_doc[s] != sent_doc[s - 1] else 0
        if s > start_sent and used + extra + lengths[s] > room:
            rows.append(_packed_row(docs, start_sent, s, sent_doc))
            start_sent, used, extra = s, 0, 0
        used += extra + int(lengths[s])
    if docs.num_sentences > start_sent:
        rows.append(_packed_row(docs, start_sent, docs.num_sentences, sent_doc))
    return Instances.from_rows(rows)


def _packed_row(docs: TokenizedDocs, s0: int, s1: int, sent_doc: np.ndarray) -> tuple[int, ...]:
    start, end = int(docs.sent_offsets[s0]), int(docs.sent_offsets[s1])
    return (start, end, end, end, NSP_IGNORE, int(sent_doc[s0]), -1)


def inner_boundaries(docs: TokenizedDocs, start: int, end: int) -> np.ndarray:
    """Positions (relative to `start`) of the document boundaries strictly inside tokens[start:end]."""
    tok_doc_starts = docs.sent_offsets[docs.doc_offsets[:-1]]
    lo, hi = np.searchsorted(tok_doc_starts, [start, end], side="right")
    inner = tok_doc_starts[lo:hi]
    return (inner[inner < end] - start).astype(np.int64)


def materialize(docs: TokenizedDocs, inst: Instances, i: int, cls_id: int, sep_id: int) -> tuple[np.ndarray, int]:
    """Token ids of instance i with its special tokens, and the length of segment A incl. [CLS] and [SEP].

    Token types are 0 for the first `len_a` positions and 1 after (packed sequences: len_a = the whole length).
    """
    a = docs.tokens[inst.a_start[i] : inst.a_end[i]]
    if inst.nsp_label[i] == NSP_IGNORE:
        cuts = inner_boundaries(docs, int(inst.a_start[i]), int(inst.a_end[i]))
        body = np.insert(a, cuts, sep_id) if len(cuts) else a
        ids = np.concatenate([[cls_id], body, [sep_id]])
        return ids, len(ids)
    b = docs.tokens[inst.b_start[i] : inst.b_end[i]]
    ids = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]])
    return ids, len(a) + 2


def materialize_all(docs: TokenizedDocs, inst: Instances, cls_id: int, sep_id: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`materialize` for every instance at once: flat token ids, int64 offsets [N+1] and len_a [N].

    One gather over index ranges instead of a Python loop per instance: writing the arrays then costs about
    what copying the tokens costs, which keeps the data stage close to the tokenizer's own speed.
    """
    n = len(inst)
    if n == 0:
        return np.zeros(0, dtype=docs.tokens.dtype), np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cls_at, sep_at = len(docs.tokens), len(docs.tokens) + 1  # the two special tokens appended to the source
    source = np.concatenate([docs.tokens, np.asarray([cls_id, sep_id], dtype=docs.tokens.dtype)])
    packed = inst.nsp_label == NSP_IGNORE
    seg_lo, seg_hi, seg_inst = [], [], []
    if (~packed).any():
        idx = np.flatnonzero(~packed)
        one = np.ones(len(idx), dtype=np.int64)
        # [CLS] A [SEP] B [SEP] as five ranges per instance, row-major.
        lo = np.stack([one * cls_at, inst.a_start[idx], one * sep_at, inst.b_start[idx], one * sep_at], axis=1)
        seg_lo.append(lo.ravel())
        seg_hi.append((lo + np.stack([one, inst.a_end[idx] - inst.a_start[idx], one,
                                      inst.b_end[idx] - inst.b_start[idx], one], axis=1)).ravel())
        seg_inst.append(np.repeat(idx, 5))
    if packed.any():
        lo, hi, owner = _packed_segments(docs, inst, np.flatnonzero(packed), cls_at, sep_at)
        seg_lo.append(lo), seg_hi.append(hi), seg_inst.append(owner)
    lo, hi, owner = (np.concatenate(x) for x in (seg_lo, seg_hi, seg_inst))
    order = np.argsort(owner, kind="stable")  # instances in their own order, segments in theirs
    lo, hi, owner = lo[order], hi[order], owner[order]
    lengths = np.bincount(owner, weights=hi - lo, minlength=n).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    len_a = np.where(packed, lengths, inst.a_end - inst.a_start + 2).astype(np.int64)
    return source[ranges(lo, hi)], offsets, len_a


def _packed_segments(docs: TokenizedDocs, inst: Instances, idx: np.ndarray, cls_at: int, sep_at: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranges of packed instances `idx`: [CLS], then each document's piece of the span followed by a [SEP]."""
    doc_start = docs.sent_offsets[docs.doc_offsets[:-1]]
    doc_end = docs.sent_offsets[docs.doc_offsets[1:]]
    s, e = inst.a_start[idx], inst.a_end[idx]
    k_lo = np.searchsorted(doc_start, s, side="right") - 1  # the document holding the first token
    k_hi = np.searchsorted(doc_start, e, side="left")  # one past the last document starting before the end
    count = k_hi - k_lo
    k = ranges(k_lo, k_hi)
    owner = np.repeat(idx, count)
    piece_lo = np.maximum(np.repeat(s, count), doc_start[k])
    piece_hi = np.minimum(np.repeat(e, count), doc_end[k])
    lo = np.stack([piece_lo, np.full(len(k), sep_at)], axis=1).ravel()
    hi = np.stack([piece_hi, np.full(len(k), sep_at + 1)], axis=1).ravel()
    first = 2 * np.concatenate([[0], np.cumsum(count)[:-1]])
    lo, hi = np.insert(lo, first, cls_at), np.insert(hi, first, cls_at + 1)
    return lo, hi, np.insert(np.repeat(owner, 2), first, idx)
