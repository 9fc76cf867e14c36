"""Decontamination: corpus text that shares a long n-gram with an evaluation set is removed before pretraining.

The invariant: no kept document contains an n-gram of an indexed evaluation text (after normalisation); every
document that lost text is listed in `decontamination.jsonl` with the task, split and n-gram it matched; and
read = kept + filtered + duplicates + quarantined + decontaminated (documents removed whole; in passage mode a
document keeps what is left of it and is counted as `decontaminated_edited`).

What counts as the same text follows GPT-3's 13-gram overlap check as datatrove implements it (datatrove's
`simplify_text`, without its digit folding, and a whitespace split where it runs nltk's tokenizer after removing
the punctuation that tokenizer would split on):
- normalise: NFKD with combining marks dropped (diacritics), lower case, clitics split off by Penn Treebank
  tokenisation re-attached (SST-2's "does n't", "it 's"), every character that is not a letter, digit or
  whitespace deleted, not made a space ("don't" -> "dont", "well-known" -> "wellknown", on both sides), split on
  whitespace;
- an n-gram is `ngram` consecutive words. A corpus document's n-grams run across its sentence and paragraph
  boundaries; an eval text's stay inside it (one GLUE sentence, one SQuAD context or question, one CoNLL
  sentence). An eval text shorter than `ngram` words gives none, as in datatrove and GPT-3's fixed-n runs: the
  manifest counts these `short_texts`, and a smaller `ngram` covers short-sentence tasks such as CoLA.

The eval side is small (GLUE dev/test: ~10^5-10^6 n-grams), the corpus side huge. So the eval n-grams are hashed
to 64 bits and kept as one sorted numpy array (with a parallel array naming each hash's task and split), built
once by the stage's launcher and written to the work directory, where each worker reads it once (like the spill
files). A sorted array rather than a Python set: 16 bytes per n-gram (12 in the array, 4 in its bitset filter)
instead of ~90 for a set of Python ints, and a whole batch of document n-grams is looked up at once in numpy
(`EvalIndex.contains`), with no Python step per n-gram. Not a Beam side input: Beam's DaskRunner recomputes a
side input's lineage inside every task that reads it, and a constant in the graph would ship megabytes in every
job description.

Document n-grams are hashed per batch of documents in numpy: words by a polynomial hash of their UTF-8 bytes
(as `MinHasher` does), n-grams by a position-weighted sum of their words' hashes, both finished by splitmix64.
With 64-bit hashes a false match needs a collision: about (corpus n-grams x index size) / 2^64, well under one
for a 10^10-word corpus against 10^6 eval n-grams. On the shared Wikipedia extract the check runs at ~27 MB/s a
core, against ~7 MB/s for the rest of a work unit's processing.
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bertscale.config import DecontaminationConfig
from bertscale.corpus.dedup import splitmix64
from bertscale.corpus.eval_sets import EvalFileStats, read_eval_file
from bertscale.corpus.output import join, read_bytes, write_bytes
from bertscale.corpus.sentences import sentence_tree

INDEX_RECORD = np.dtype([("hash", "<u8"), ("source", "<u4")])
_POLY = np.uint64(0x100000001B3)  # odd, so invertible mod 2^64
_POLY_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_SALT = np.uint64(0x2545F4914F6CDD1D)
# One odd multiplier per position in the n-gram, so that the same words in another order hash differently.
_POSITION_MIX = splitmix64(np.arange(1, 65, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
_EVAL_CHUNK = 4096  # eval texts hashed at once

# --------------------------------------------------------------------------------------------------------------
# Normalisation and n-gram hashes
# --------------------------------------------------------------------------------------------------------------
_CLITIC = re.compile(r"\s+(?=(?:n['\u2019]t|['\u2019](?:s|re|ve|ll|d|m))(?!\w))", re.IGNORECASE)
# What the regex could match, as plain substrings: most documents have none, and `in` is much cheaper than a scan.
_CLITIC_STARTS = tuple(f" {c}" for base in ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
                       for up in (base, base.upper()) for c in (up, up.replace("'", "\u2019")))
# On ASCII bytes, in one C pass: upper case to lower, control characters and whitespace to a space, punctuation
# and symbols deleted.
_ASCII_TABLE = bytes(32 if b <= 32 else ord(chr(b).lower()) if b < 128 else b for b in range(256))
_ASCII_DELETE = bytes(b for b in range(33, 128) if not chr(b).isalnum())


def _non_ascii(err: UnicodeError) -> tuple[bytes, int]:
    """Encoding error handler for the non-ASCII runs of a text: letters and digits kept (as UTF-8), whitespace
    made a space, everything else (punctuation, symbols, the combining marks NFKD split off) deleted."""
    run = err.object[err.start:err.end]  # type: ignore[attr-defined]
    kept = "".join(c if c.isalnum() else " " if c.isspace() else "" for c in run)
    return kept.encode("utf-8"), err.end  # type: ignore[attr-defined]


codecs.register_error("bertscale.decontaminate", _non_ascii)


def normalized_bytes(text: str) -> bytes:
    """The text as compared, UTF-8 encoded: diacritics dropped (NFKD, combining marks deleted), lower case, PTB
    clitics re-attached, punctuation and symbols deleted, any whitespace a space (words may be separated by
    several). Python's regex engine would spend ~30 ns a character here; this runs the ASCII part in C and calls
    Python once per run of non-ASCII characters."""
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text).lower()
    if any(start in text for start in _CLITIC_STARTS):
        text = _CLITIC.sub("", text)
    return text.encode("ascii", errors="bertscale.decontaminate").translate(_ASCII_TABLE, _ASCII_DELETE)


def normalize(text: str) -> str:
    """`normalized_bytes` as a string of words separated by single spaces."""
    return " ".join(normalized_bytes(text).decode("utf-8").split())


class NgramHasher:
    """Hashes of the n-grams of normalised texts, a batch at a time. A word's hash is the polynomial
    sum_j b_j p^j mod 2^64 of its bytes: over a batch, every byte is weighted by p^(its offset in the batch), one
    reduceat sums each word, and p^-(the word's start) shifts it back; the powers are kept between batches."""

    DIRECT_BYTES = 1 << 23  # batches up to this size use powers of the whole batch (2 x 64 MiB at most)

    def __init__(self, n: int) -> None:
        self.n = n
        self._pow = self._inv = np.ones(1, dtype=np.uint64)

    def _powers(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self._pow) < size:
            grown = max(size, min(2 * len(self._pow), self.DIRECT_BYTES))
            with np.errstate(over="ignore"):
                self._pow = np.cumprod(np.full(grown, _POLY, dtype=np.uint64)) * _POLY_INV
                self._inv = np.cumprod(np.full(grown, _POLY_INV, dtype=np.uint64)) * _POLY
        return self._pow[:size], self._inv[:size]

    def _words(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hashes of the words of UTF-8 bytes (a word ends at any byte <= 32) and each word's first
        byte."""
        end = data <= 32
        inside = np.concatenate(([False], ~end, [False]))
        starts = np.flatnonzero(inside[1:] != inside[:-1])[0::2]
        if not len(starts):
            return np.zeros(0, dtype=np.uint64), starts
        masked = np.where(end, np.uint8(0), data)
        with np.errstate(over="ignore"):
            if len(data) <= self.DIRECT_BYTES:
                pw, inv = self._powers(len(data))
                sums = np.add.reduceat(masked * pw, starts) * inv[starts]
            else:  # a huge batch (one long document): exponents counted from each word's start
                marks = np.zeros(len(data), dtype=np.int64)
                marks[starts] = starts
                offset = np.arange(len(data)) - np.maximum.accumulate(marks)
                sums = np.add.reduceat(masked * self._powers(int(offset.max()) + 1)[0][offset], starts)
            return splitmix64(sums ^ _SALT), starts

    def hashes(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hash, text, word) of every n-gram inside each of the `normalized_bytes` texts, in order; `word` is
        the position of the n-gram's first word in its text."""
        data = np.frombuffer(b"\n".join(texts), dtype=np.uint8)
        words, starts = self._words(data)
        count = len(words) - self.n + 1
        if count <= 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        text_of = np.searchsorted(np.flatnonzero(data == 10), starts)  # separators before the word
        position = np.arange(len(words)) - np.searchsorted(text_of, np.arange(len(texts)))[text_of]
        acc = np.zeros(count, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(self.n):
                acc += words[j:j + count] * _POSITION_MIX[j]
        inside = np.flatnonzero(text_of[:count] == text_of[self.n - 1:])
        return splitmix64(acc[inside]), text_of[inside], position[inside]


def ngram_hashes(texts: list[bytes], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`NgramHasher(n).hashes(texts)`."""
    return NgramHasher(n).hashes(texts)


# --------------------------------------------------------------------------------------------------------------
# The index of eval n-grams
# --------------------------------------------------------------------------------------------------------------
@dataclass
class EvalIndex:
    """Hashed eval n-grams, sorted, each with the (task, split) it came from (a hash shared by two splits is
    there twice).

    Nearly every corpus n-gram is not in the index, and a binary search costs a cache miss per level; so a
    bitset over the hashes' top bits (32 bits per n-gram, at most 128 MiB: ~3% of the slots set) settles most
    lookups with one probe, and only the rest are searched."""

    ngram: int
    sources: list[tuple[str, str]]  # (task, split) by source id
    records: np.ndarray  # INDEX_RECORD, sorted by (hash, source)

    def __post_init__(self) -> None:
        bits = int(np.clip(np.ceil(np.log2(max(len(self.records), 1) * 32)), 16, 30))
        self._shift = np.uint64(64 - bits)
        slots = np.unique(self.records["hash"] >> self._shift)
        self._bitset = np.zeros(2 ** bits // 8, dtype=np.uint8)
        np.bitwise_or.at(self._bitset, slots >> np.uint64(3), (np.uint64(1) << (slots & np.uint64(7))).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.records)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Which of `hashes` are eval n-grams."""
        slots = hashes >> self._shift
        maybe = np.flatnonzero((self._bitset[slots >> np.uint64(3)] >> (slots & np.uint64(7))) & np.uint64(1))
        found = np.zeros(len(hashes), dtype=bool)
        if len(maybe):
            keys, wanted = self.records["hash"], hashes[maybe]
            found[maybe] = keys[np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)] == wanted
        return found

    def source_ids(self, hashes: np.ndarray) -> list[list[int]]:
        """The source ids of each of `hashes` (all of them eval n-grams)."""
        keys = self.records["hash"]
        lo, hi = np.searchsorted(keys, hashes, "left"), np.searchsorted(keys, hashes, "right")
        ids = self.records["source"]
        return [ids[a:b].tolist() for a, b in zip(lo.tolist(), hi.tolist())]

    def save(self, directory: str) -> None:
        write_bytes(join(directory, "index.bin"), self.records.tobytes())
        write_bytes(join(directory, "sources.json"),
                    json.dumps({"ngram": self.ngram, "sources": self.sources}).encode("utf-8"))

    @classmethod
    def load(cls, directory: str) -> EvalIndex:
        meta = json.loads(read_bytes(join(directory, "sources.json")))
        records = np.frombuffer(read_bytes(join(directory, "index.bin")), dtype=INDEX_RECORD)
        return cls(meta["ngram"], [tuple(s) for s in meta["sources"]], records)


def is_active(cfg: DecontaminationConfig) -> bool:
    return cfg.enabled and bool(cfg.eval_files)


def index_dir(work_dir: str) -> str:
    return join(work_dir, "decontamination")


def build_index(cfg: DecontaminationConfig) -> tuple[EvalIndex, list[EvalFileStats]]:
    """The index of every eval file's n-grams, and what was read from each file."""
    sources: dict[tuple[str, str], int] = {}
    parts, all_stats = [], []
    hasher = NgramHasher(cfg.ngram)
    for entry in cfg.eval_files:
        source = sources.setdefault((entry.task, entry.split), len(sources))
        stats = EvalFileStats(entry.task, entry.split, entry.path, entry.format)
        texts = [normalized_bytes(text) for text in read_eval_file(entry, stats)]
        stats.short_texts = sum(1 for text in texts if len(text.split()) < cfg.ngram)
        hashes = np.unique(np.concatenate([np.zeros(0, dtype=np.uint64)] + [
            hasher.hashes(texts[i:i + _EVAL_CHUNK])[0] for i in range(0, len(texts), _EVAL_CHUNK)]))
        stats.ngrams = len(hashes)
        part = np.empty(len(hashes), dtype=INDEX_RECORD)
        part["hash"], part["source"] = hashes, source
        parts.append(part)
        all_stats.append(stats)
    records = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=INDEX_RECORD)
    return EvalIndex(cfg.ngram, list(sources), records), all_stats


# --------------------------------------------------------------------------------------------------------------
# Checking documents
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Contamination:
    """What a document shares with the eval sets and what is left of it."""

    text: str | None  # the document without its matching passages; None: the document goes
    ngrams: dict[int, str] = field(default_factory=dict)  # source id -> the first n-gram it matched
    passages: int = 0  # sentences removed (passage mode)


class Decontaminator:
    """Finds eval n-grams in documents (a batch at a time) and removes the documents or their passages."""

    def __init__(self, index: EvalIndex, mode: str = "document") -> None:
        self.index, self.n, self.mode = index, index.ngram, mode
        self.hasher = NgramHasher(self.n)

    def _hits(self, normalized: list[bytes]) -> Iterator[tuple[int, int, list[int]]]:
        """(text, word position, source ids) of every eval n-gram in the normalised texts, in order."""
        hashes, text, position = self.hasher.hashes(normalized)
        hit = self.index.contains(hashes)
        if hit.any():
            yield from zip(text[hit].tolist(), position[hit].tolist(), self.index.source_ids(hashes[hit]))

    def scan(self, texts: list[str]) -> list[dict[int, int]]:
        """Per text, {source id: word position of the first n-gram of that source} (empty when clean)."""
        found: list[dict[int, int]] = [{} for _ in texts]
        for text, position, sources in self._hits([normalized_bytes(t) for t in texts]):
            for source in sources:
                found[text].setdefault(source, position)
        return found

    def resolve(self, text: str, found: dict[int, int]) -> Contamination:
        """The outcome for a document `scan` found matches in."""
        if self.mode == "passage":
            result = self.remove_passages(text)
            if result.passages:
                return result
            # Sentence splitting can join words that whitespace had separated (CJK full stops): drop it whole.
        words = normalize(text).split()
        return Contamination(None, {s: " ".join(words[p:p + self.n]) for s, p in found.items()})

    def remove_passages(self, text: str) -> Contamination:
        """The document without every sentence a matching n-gram touches (n-grams run across sentences),
        repeated until no match is left: removing a sentence joins its neighbours into new n-grams."""
        tree = sentence_tree(text)
        ngrams: dict[int, str] = {}
        removed = 0
        while True:
            sentences = [normalize(s).split() for paragraph in tree for block in paragraph for s in block]
            words = [w for sentence in sentences for w in sentence]
            owner = np.repeat(np.arange(len(sentences)), [len(s) for s in sentences])
            drop: set[int] = set()
            for _, position, sources in self._hits([" ".join(words).encode("utf-8")]):
                drop.update(owner[position:position + self.n].tolist())
                for source in sources:
                    ngrams.setdefault(source, " ".join(words[position:position + self.n]))
            if not drop:
                break
            removed += len(drop)
            tree = _without(tree, drop)
        kept = "\n\n".join("\n".join(" ".join(block) for block in paragraph) for paragraph in tree)
        return Contamination(kept or None, ngrams, removed)


def _without(tree: list[list[list[str]]], drop: set[int]) -> list[list[list[str]]]:
    """The sentence tree without the sentences of the given flat indices (and blocks and paragraphs left
    empty)."""
    out, k = [], 0
    for paragraph in tree:
        blocks = []
        for block in paragraph:
            kept = [s for i, s in enumerate(block, k) if i not in drop]
            k += len(block)
            if kept:
                blocks.append(kept)
        if blocks:
            out.append(blocks)
    return out


def load_decontaminator(cfg: DecontaminationConfig, work_dir: str) -> Decontaminator | None:
    """The worker's decontaminator, from the index the launcher wrote; None when decontamination is off."""
    if not is_active(cfg):
        return None
    return Decontaminator(EvalIndex.load(index_dir(work_dir)), cfg.mode)
