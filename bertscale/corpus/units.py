"""Per-unit work of the corpus stage: read, clean, filter, hash and sentence-split the documents of one work unit.

A unit's kept documents go to its spill file (parquet, in the work directory every worker can reach), and its
dedup keys with integer document references to two key files, sorted by dedup bucket. What leaves the unit
through the pipeline is small: the (bucket, start, end) spans of its key files, counts and quarantine records.
A bucket's dedup step reads its span of every unit's key file, so keys never travel through a shuffle (a local
runner would hold each shuffle in the launching process's memory, growing with the corpus).
A document reference is `unit << 32 | row`, the document's row in its unit's spill file. Units are planned in
document order and rows are written in position order, so integer order of references equals the canonical
document order (`doc_sort_key`): "keep the smallest reference" keeps the first copy in the corpus, and comparing
plain ints is cheaper in the shuffles than parsing string ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from bertscale.config import CorpusConfig
from bertscale.corpus.cleaning import clean_text
from bertscale.corpus.decontaminate import Contamination, load_decontaminator
from bertscale.corpus.dedup import (
    BAND_RECORD,
    EXACT_RECORD,
    MinHasher,
    band_key_matrix,
    band_records,
    bucket_order,
    exact_key,
    exact_records,
    lsh_params,
)
from bertscale.corpus.filters import DocView, build_rules, first_failed, first_failed_rule
from bertscale.corpus.output import SpillWriter, join, metadata_json, open_for_read, write_bytes
from bertscale.corpus.readers import Record, Rejected, WorkUnit, make_doc_id, read_unit
from bertscale.corpus.sentences import split_sentences

log = logging.getLogger(__name__)
_ROW_BITS = 32


def doc_ref(unit: int, row: int) -> int:
    return (unit << _ROW_BITS) | row


def ref_unit(ref: int) -> int:
    return ref >> _ROW_BITS


def ref_row(ref: int) -> int:
    return ref & ((1 << _ROW_BITS) - 1)


def spill_path(work_dir: str, index: int) -> str:
    return join(work_dir, "units", f"unit-{index:06d}.parquet")


KEY_KINDS = {"exact": EXACT_RECORD, "bands": BAND_RECORD}
Span = tuple[int, int, int]  # (bucket, first record, end record) in a unit's key file


def key_path(work_dir: str, index: int, kind: str) -> str:
    return join(work_dir, "units", f"unit-{index:06d}.{kind}")


def write_keys(work_dir: str, index: int, kind: str, records: np.ndarray, buckets: int) -> list[Span]:
    """A unit's key file of `kind` (its records sorted by bucket), and the spans of its non-empty buckets."""
    ordered, spans = bucket_order(records, buckets)
    write_bytes(key_path(work_dir, index, kind), ordered.tobytes())
    return spans


def read_keys(work_dir: str, kind: str, slices: Iterable[tuple[int, int, int]]) -> Iterator[bytes]:
    """The packed records of (unit, start, end) slices of the units' key files of `kind`."""
    size = KEY_KINDS[kind].itemsize
    for unit, start, end in sorted(slices):
        with open_for_read(key_path(work_dir, unit, kind)) as fh:
            fh.seek(start * size)
            yield fh.read((end - start) * size)


@dataclass
class UnitResult:
    """What a processed unit sends on: dedup keys with document references, counts, quarantine records and
    decontamination report records."""

    index: int
    rows: int = 0  # documents in the unit's spill file
    exact: list[Span] = field(default_factory=list)  # spans of the unit's exact-key file
    bands: list[Span] = field(default_factory=list)  # spans of the unit's LSH band-key file
    counts: dict[str, int] = field(default_factory=dict)
    quarantine: list[dict] = field(default_factory=list)
    decontaminated: list[dict] = field(default_factory=list)


@dataclass
class _Passed:
    """A document that passed the rules, waiting for its batch's MinHash signatures."""

    doc_id: str
    position: int
    text: str
    sentences: list[str]
    exact: bytes | None
    metadata: str


@dataclass
class _Batch:
    docs: list[_Passed] = field(default_factory=list)
    chars: int = 0


class UnitProcessor:
    """Reads, cleans, filters, decontaminates, splits and hashes the documents of one work unit.

    Per-document work (cleaning, rules, sentences) runs document by document; the eval n-gram lookup, MinHash and
    LSH band keys run in numpy over batches of `BATCH` passed documents, which is where the per-document Python
    overhead would cost most.
    """

    BATCH = 256  # documents per MinHash batch
    BATCH_CHARS = 1 << 21  # or fewer, when their text reaches this: bounds the batch's numpy arrays

    def __init__(self, cfg: CorpusConfig, work_dir: str, buckets: int) -> None:
        self.cfg, self.work_dir, self.buckets = cfg, work_dir, buckets
        self.rules = build_rules(cfg.filters)
        d = cfg.dedup
        self.hasher = MinHasher(d.num_perm, d.shingle_size, d.seed) if d.near else None
        self.bands, self.rows = lsh_params(d.threshold, d.num_perm)
        self.decontaminator = load_decontaminator(cfg.decontamination, work_dir)

    def __call__(self, index: int, unit: WorkUnit) -> UnitResult:
        counts: Counter[str] = Counter()
        result = UnitResult(index)
        writer = SpillWriter(spill_path(self.work_dir, index))
        batch = _Batch()
        exact: list[np.ndarray] = []
        bands: list[np.ndarray] = []
        for item in guarded_records(unit, self.cfg, counts):
            counts["read"] += 1
            if isinstance(item, Record):
                if item.invalid_bytes:
                    counts["utf8_repaired_docs"] += 1
                    counts["invalid_utf8_bytes"] += item.invalid_bytes
                item = self._guarded_document(unit, item, counts, batch)
            if isinstance(item, Rejected):
                counts["quarantined"] += 1
                result.quarantine.append({"file": unit.file.path, "position": item.position, "reason": item.reason})
            if len(batch.docs) >= self.BATCH or batch.chars >= self.BATCH_CHARS:
                self._flush(unit, batch, counts, writer, result, exact, bands)
        self._flush(unit, batch, counts, writer, result, exact, bands)
        writer.close()
        result.rows, result.counts = writer.rows, dict(counts)
        for kind, parts in (("exact", exact), ("bands", bands)):
            records = np.concatenate(parts) if parts else np.empty(0, KEY_KINDS[kind])
            setattr(result, kind, write_keys(self.work_dir, index, kind, records, self.buckets))
        return result

    def _guarded_document(self, unit: WorkUnit, record: Record, counts: Counter[str],
                          batch: _Batch) -> Rejected | None:
        """`_document`, with any error it raises turned into a quarantined record: one pathological document
        must cost that document, not the whole job."""
        try:
            self._document(unit, record, counts, batch)
        except Exception as err:
            log.warning("corpus: %s position %d failed and is quarantined", unit.file.path, record.position,
                        exc_info=True)
            return Rejected(record.position, failure_reason("processing failed", err))
        return None

    def _document(self, unit: WorkUnit, record: Record, counts: Counter[str], batch: _Batch) -> None:
        # Everything is computed before anything is recorded, so a failure part-way leaves no trace of the document.
        text = clean_text(record.text, self.cfg.normalization, self.cfg.strip_markup)
        view = DocView(text)
        rule = first_failed(view, self.rules)
        if rule is not None:
            counts["filtered"] += 1
            counts[f"filtered_{rule}"] += 1
            return
        batch.docs.append(_Passed(make_doc_id(unit.file.rel, record.position), record.position, text,
                                  *self._derived(text, view.split_words), metadata_json(record.metadata)))
        batch.chars += len(text)

    def _derived(self, text: str, words: list[str] | None = None) -> tuple[list[str], bytes | None]:
        """A passed document's sentences and exact-dedup key (`words`: `text.split()` when already known)."""
        key = exact_key(text, words) if self.cfg.dedup.exact else None
        return split_sentences(text, self.cfg.min_sentence_chars), key

    def _flush(self, unit: WorkUnit, batch: _Batch, counts: Counter[str], writer: SpillWriter, result: UnitResult,
               exact: list[np.ndarray], bands: list[np.ndarray]) -> None:
        """Decontaminate a batch of passed documents, hash the rest and record them: spill rows, exact keys, band
        keys."""
        if self.decontaminator is not None and batch.docs:
            batch.docs = self._decontaminate(unit, batch.docs, counts, result)
        if not batch.docs:
            batch.chars = 0
            return
        refs = doc_ref(result.index, writer.rows) + np.arange(len(batch.docs), dtype=np.int64)
        sigs = self.hasher.signatures([d.text for d in batch.docs]) if self.hasher is not None else None
        if sigs is not None:
            bands.append(band_records(band_key_matrix(sigs, self.bands, self.rows), refs))
        with_key = [i for i, doc in enumerate(batch.docs) if doc.exact is not None]
        if with_key:
            exact.append(exact_records([batch.docs[i].exact for i in with_key], refs[with_key]))
        for i, doc in enumerate(batch.docs):
            writer.add(doc.doc_id, doc.text, doc.sentences, unit.file.path, doc.metadata,
                       None if sigs is None else sigs[i].tobytes())
        counts["passed"] += len(batch.docs)
        batch.docs, batch.chars = [], 0

    def _decontaminate(self, unit: WorkUnit, docs: list[_Passed], counts: Counter[str],
                       result: UnitResult) -> list[_Passed]:
        """The documents that stay: clean ones, and in passage mode what is left of a matching one if that still
        passes the rules. Each matching document is counted per task and listed per (task, split)."""
        kept = []
        for doc, found in zip(docs, self.decontaminator.scan([d.text for d in docs])):
            if not found:
                kept.append(doc)
                continue
            try:
                outcome = self.decontaminator.resolve(doc.text, found)
                if outcome.text is not None and first_failed_rule(outcome.text, self.rules) is None:
                    doc.text = outcome.text
                    doc.sentences, doc.exact = self._derived(outcome.text)
                else:
                    outcome.text = None
            except Exception as err:
                log.warning("corpus: decontaminating %s failed; it is quarantined", doc.doc_id, exc_info=True)
                counts["quarantined"] += 1
                result.quarantine.append({"file": unit.file.path, "position": doc.position,
                                          "reason": failure_reason("decontamination failed", err)})
                continue
            if outcome.text is None:
                counts["decontaminated"] += 1
            else:
                kept.append(doc)
                counts["decontaminated_edited"] += 1
                counts["decontaminated_passages"] += outcome.passages
            self._report(unit, doc, outcome, counts, result)
        return kept

    def _report(self, unit: WorkUnit, doc: _Passed, outcome: Contamination, counts: Counter[str],
                result: UnitResult) -> None:
        sources = self.decontaminator.index.sources
        for task in sorted({sources[s][0] for s in outcome.ngrams}):
            counts[f"decontaminated_task_{task}"] += 1
        for source, ngram in sorted(outcome.ngrams.items()):
            task, split = sources[source]
            counts[f"decontaminated_split_{task}/{split}"] += 1
            result.decontaminated.append({
                "doc_id": doc.doc_id, "source": unit.file.path, "task": task, "split": split, "ngram": ngram,
                "action": "document" if outcome.text is None else "passages", "passages": outcome.passages})


def failure_reason(what: str, err: BaseException) -> str:
    first_line = (str(err).splitlines() or [""])[0]
    return f"{what}: {type(err).__name__}: {first_line[:200]}"


def guarded_records(unit: WorkUnit, cfg: CorpusConfig, counts: Counter[str]) -> Iterator[Record | Rejected]:
    """`read_unit`, with an unexpected reader error turned into one rejected record (the records before it are
    kept, as for a truncated archive) instead of an exception that fails the job."""
    last = unit.start
    try:
        for item in read_unit(unit, cfg, counts):
            last = item.position
            yield item
    except Exception as err:
        log.warning("corpus: reading %s failed after position %d", unit.file.path, last, exc_info=True)
        yield Rejected(last, failure_reason(f"reader failed after position {last}", err) + "; records before "
                             "it were kept")
